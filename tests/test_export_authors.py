"""`ecamp train export --format authors`: a .pth the authors' fine-tuning code, from_authors and convert read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ecamp
from ecamp.cli import main as ecamp_main
from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
from ecamp.train.cli import main as train_main
from ecamp.train.common.checkpoint import checkpoint_name, save_checkpoint
from ecamp.train.pretrain.config import load_config
from ecamp.train.pretrain.loop import CHECKPOINT_FORMAT

from helpers.builders import TINY_MODEL

TINY = TINY_MODEL


def _batch(cfg: ECAMPPretrainConfig, b: int = 2, length: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(5, cfg.vocab_size, (b, length), generator=g)
    ids = labels.clone()
    ids[:, 2:7] = 3  # [MASK]
    return {"image": torch.randn(b, 3, cfg.sr_img_size, cfg.sr_img_size, generator=g), "input_ids": ids,
            "labels": labels, "attention_mask": torch.ones(b, length, dtype=torch.long),
            "token_type_ids": torch.zeros(b, length, dtype=torch.long), "weights": torch.rand(b, length, generator=g),
            "sr_window": torch.tensor([[0, 1], [1, 0]]), "noise": torch.rand(b, cfg.grid**2, generator=g)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with one ecamp training checkpoint of a tiny model whose every weight was moved off its init."""
    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = ECAMPPretrainModel(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("run")
    save_checkpoint(folder / checkpoint_name(3), {"model": model.state_dict(), "config": json.dumps(cfg.to_dict()),
                                                  "format": CHECKPOINT_FORMAT, "step": 3})
    return folder, model.eval(), cfg


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    folder, _, _ = run
    out = tmp_path_factory.mktemp("authors") / "ecamp.pth"
    assert train_main(["export", str(folder), "--format", "authors", "--out", str(out)]) == 0
    return out


def test_writes_the_authors_key_names_and_nothing_else(exported, run):
    _, model, cfg = run
    assert sorted(p.name for p in exported.parent.iterdir()) == ["ecamp.config.json", "ecamp.pth"]  # no temp files
    ckpt = torch.load(exported, map_location="cpu", weights_only=True)
    assert list(ckpt) == ["model"]
    keys = set(ckpt["model"])
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.1.attn.qkv.weight", "norm.weight",
                "mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight",
                "decoder_pred.weight", "super_res.conv1.weight", "bert_mlp.weight",
                "bert_encoder.model.bert.embeddings.word_embeddings.weight",
                "bert_encoder.model.bert.encoder.layer.0.attention.self.query.weight",
                "bert_encoder.model.cls.predictions.decoder.weight"):
        assert key in keys, key
    assert any(k.startswith("bert_encoder.model.bert.context_fusion_layer.") for k in keys)
    assert not any(k.startswith(("encoder.", "text.")) for k in keys)
    assert len(keys) == len(model.state_dict()) + 2  # and the unused pooler, which their classes build
    assert not ckpt["model"]["bert_encoder.model.bert.pooler.dense.weight"].any()
    assert json.loads(exported.with_name("ecamp.config.json").read_text()) == cfg.model.to_dict()


def test_the_authors_finetuning_load_takes_every_encoder_tensor(exported, run):
    """Their classification setup: a timm ViT with global_pool and fc_norm (norm deleted), checkpoint['model']
    loaded with strict=False; segmentation and detection match the same unprefixed names."""
    import timm

    _, model, cfg = run
    m = cfg.model
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=5, global_pool="avg",
                            fc_norm=True, img_size=m.img_size, patch_size=m.patch_size, embed_dim=m.embed_dim,
                            depth=m.depth, num_heads=m.num_heads)
    state = torch.load(exported, map_location="cpu", weights_only=True)["model"]
    result = vit.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc_norm.bias", "fc_norm.weight", "head.bias", "head.weight"]
    loaded = vit.state_dict()
    for key, value in model.encoder.state_dict().items():
        if not key.startswith("norm."):  # their global-pool model replaces norm by a fresh fc_norm
            assert torch.equal(loaded[key], value), key


def test_from_authors_gives_identical_losses(exported, run):
    _, model, cfg = run
    again = ECAMPPretrainModel.from_authors(exported, config=cfg.model).eval()
    batch = _batch(cfg.model)
    with torch.no_grad():
        a, b = model(batch), again(batch)
    for k in ("loss", "mim_loss", "sr_loss", "mlm_loss"):
        assert torch.equal(a[k], b[k]), k
    assert float(a["loss"]) > 0


def test_convert_of_the_export_gives_identical_features(exported, run, tmp_path):
    _, model, _ = run
    out = tmp_path / "enc"
    assert ecamp_main(["convert", str(exported), "--name", "cxr-vit-b", "--out", str(out), "--config",
                       str(exported.with_name("ecamp.config.json"))]) == 0
    enc = ecamp.load(f"local-dir:{out}")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(enc.forward_features(x), model.encoder.forward_features(x))


def test_authors_format_refuses_the_ecamp_only_options(run, tmp_path, capsys):
    folder, _, _ = run
    assert train_main(["export", str(folder), "--format", "authors", "--out", str(tmp_path / "x.pth"),
                       "--name", "cxr-vit-b"]) == 2
    assert "--format ecamp" in capsys.readouterr().err and not (tmp_path / "x.pth").exists()
    assert train_main(["export", str(folder), "--out", str(tmp_path / "folders")]) == 2
    assert "needs --name" in capsys.readouterr().err
    assert train_main(["export", str(folder), "--format", "authors", "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert not list(Path(tmp_path).iterdir())
