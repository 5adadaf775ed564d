"""The GPU path's speed options keep pre-training's numbers: fused AdamW, torch.compile, SDPA attention in the text
tower, and the bad-sample budget riding in the loss all-reduce. Everything here runs on the CPU."""

from __future__ import annotations

import copy
import os
import tempfile

import pytest
import torch

from ecamp.errors import DataError
from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
from ecamp.train.common.distributed import Runtime
from ecamp.train.pretrain.config import PretrainRunConfig, load_config
from ecamp.train.pretrain.loop import _BadSamples, _compiled, make_optimizer

TINY = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16, decoder_depth=1,
            decoder_num_heads=2, sr_window=2, vocab_size=50, text_hidden_size=32, text_layers=1, text_heads=2,
            text_intermediate_size=64, max_text_len=12, text_dropout=0.0)
CPU = Runtime(0, 1, 0, torch.device("cpu"))


def _tiny():
    torch.manual_seed(0)
    return ECAMPPretrainModel(ECAMPPretrainConfig(**TINY)).train()


def _batch(cfg: ECAMPPretrainConfig, b: int = 2, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = cfg.max_text_len
    return {"image": torch.randn(b, 3, cfg.sr_img_size, cfg.sr_img_size, generator=g),
            "input_ids": torch.randint(5, cfg.vocab_size, (b, n), generator=g),
            "labels": torch.randint(5, cfg.vocab_size, (b, n), generator=g),
            "attention_mask": torch.ones(b, n, dtype=torch.long), "token_type_ids": torch.zeros(b, n, dtype=torch.long),
            "weights": torch.ones(b, n), "sr_window": torch.zeros(b, 2, dtype=torch.long),
            "noise": torch.rand(b, cfg.grid**2, generator=g)}


def _losses(model, opt, call, steps: int = 2) -> list[float]:
    out = []
    for i in range(steps):
        loss = call(_batch(model.config, seed=i))["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def test_optimizer_keeps_the_authors_groups_and_is_unfused_off_cuda():
    model = _tiny()
    opt = make_optimizer(model, PretrainRunConfig(model=model.config))
    assert not opt.defaults["fused"]
    decays = {g["weight_decay"] for g in opt.param_groups}
    assert decays == {0.0, PretrainRunConfig().optim.weight_decay}
    no_decay = next(g for g in opt.param_groups if g["weight_decay"] == 0.0)
    assert all(p.ndim <= 1 for p in no_decay["params"])
    assert not any(p is model.encoder.pos_embed for g in opt.param_groups for p in g["params"])


def test_fused_adamw_updates_as_the_default_one():
    """The kernel make_optimizer picks on CUDA, run here on the CPU (torch has a CPU fused AdamW): same weights to
    float rounding after two steps, so choosing it changes nothing beyond fp32 tolerance."""
    a, b = _tiny(), _tiny()
    opt_a = make_optimizer(a, PretrainRunConfig(model=a.config))
    groups = [{**g, "params": [dict(b.named_parameters())[n] for n, p in a.named_parameters()
                               if any(p is q for q in g["params"])]} for g in opt_a.param_groups]
    opt_b = torch.optim.AdamW(groups, fused=True)
    assert _losses(a, opt_a, a) == pytest.approx(_losses(b, opt_b, b), abs=1e-6)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-5, msg=name)


def test_compile_is_an_option_off_by_default():
    assert load_config().run.compile is False
    cfg = load_config(overrides=["run.compile=true"])
    assert cfg.run.compile is True
    model = _tiny()
    assert _compiled(model, load_config()) is model
    wrapped = _compiled(model, cfg)
    assert wrapped is not model and wrapped._orig_mod is model  # checkpoints keep reading the plain model


@pytest.mark.slow
def test_compiled_steps_give_the_eager_losses():
    eager, compiled = _tiny(), _tiny()
    opt_e = make_optimizer(eager, PretrainRunConfig(model=eager.config))
    opt_c = make_optimizer(compiled, PretrainRunConfig(model=compiled.config))
    call = _compiled(compiled, load_config(overrides=["run.compile=true"]))
    assert _losses(compiled, opt_c, call) == pytest.approx(_losses(eager, opt_e, eager), abs=1e-5)


def test_text_tower_attention_is_sdpa_and_equals_eager():
    """Every BERT attention in the text tower (context fusion included) runs through SDPA, with the outputs of
    eager attention, so flash/memory-efficient kernels change nothing beyond float rounding."""
    model = _tiny().eval()
    text = model.text
    assert text.bert_config._attn_implementation == "sdpa"
    attn = [m for m in text.modules() if hasattr(m, "config") and hasattr(m.config, "_attn_implementation")]
    assert attn and all(m.config._attn_implementation == "sdpa" for m in attn)
    batch = _batch(model.config)
    with torch.no_grad():
        sdpa = model(batch)["logits"]
        eager_model = copy.deepcopy(model)
        eager_model.text.bert_config._attn_implementation = "eager"
        eager = eager_model(batch)["logits"]
    assert text.bert_config._attn_implementation == "sdpa"
    torch.testing.assert_close(sdpa, eager, atol=1e-5, rtol=1e-5)


def test_budget_on_one_process_returns_the_losses_and_stops_over_budget():
    budget = _BadSamples(2)
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    budget.add({"n_bad": 2, "errors": ["a.png: truncated", "b.png: truncated"], "image": torch.zeros(6, 1)})
    torch.testing.assert_close(budget.reduce_and_check(losses, CPU), losses)
    budget.add({"n_bad": 1, "errors": ["c.png: truncated"], "image": torch.zeros(7, 1)})
    with pytest.raises(DataError, match="3 of 16 samples.*c.png"):
        budget.reduce_and_check(losses, CPU)


def _two_ranks(rank: int, init: str, out: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    rt = Runtime(rank, 2, 0, torch.device("cpu"))
    budget = _BadSamples(3)
    # only rank 1 meets unreadable files: 2 at the first step (within budget), 2 more at the second (over it)
    budget.add({"n_bad": 2 * rank, "errors": ["x.png: truncated"] * 2 * rank, "image": torch.zeros(4, 1)})
    first = budget.reduce_and_check(torch.tensor([float(rank), 10.0], dtype=torch.float64), rt)
    budget.add({"n_bad": 2 * rank, "errors": ["y.png: truncated"] * 2 * rank, "image": torch.zeros(4, 1)})
    try:
        budget.reduce_and_check(torch.zeros(2, dtype=torch.float64), rt)
        verdict = "ran on"
    except DataError as e:
        verdict = str(e).split(",")[0]
    with open(f"{out}.{rank}", "w") as f:
        f.write(f"{first.tolist()}|{verdict}")
    torch.distributed.destroy_process_group()


def test_budget_is_judged_on_global_counts_by_every_rank_in_the_loss_all_reduce():
    with tempfile.TemporaryDirectory() as tmp:
        init, out = "file://" + os.path.join(tmp, "rendezvous"), os.path.join(tmp, "out")
        torch.multiprocessing.spawn(_two_ranks, args=(init, out), nprocs=2)
        results = [open(f"{out}.{r}").read() for r in range(2)]
    assert results[0] == results[1] == "[0.5, 10.0]|4 of 20 samples could not be read"
