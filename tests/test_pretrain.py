"""ECAMPPretrainModel: shapes, losses against hand computations, gradients, encoder export, the authors' checkpoints."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import ecamp
from ecamp.convert import encoder_for
from ecamp.errors import InvalidWeightsFileError, WeightsMismatchError
from ecamp.models.pretrain import (
    BatchError,
    ECAMPPretrainConfig,
    ECAMPPretrainModel,
    read_authors_checkpoint,
    sincos_pos_embed_2d,
)

from helpers.builders import BATCH_SIZE, TEXT_LEN, pretrain_batch

B, L = BATCH_SIZE, TEXT_LEN


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return ECAMPPretrainModel(ECAMPPretrainConfig.tiny()).eval()


def _noise(cfg, seed=1):
    return torch.rand(B, cfg.grid**2, generator=torch.Generator().manual_seed(seed))


def test_shapes_and_finite_losses(tiny):
    cfg = tiny.config
    out = tiny(pretrain_batch(cfg), noise=_noise(cfg))
    assert out["logits"].shape == (B, L, cfg.vocab_size)
    assert out["reconstruction"].shape == (B, 3, cfg.img_size, cfg.img_size)
    assert out["sr"].shape == (B, 3, cfg.sr_img_size, cfg.sr_img_size)
    assert out["mask"].shape == (B, cfg.grid**2) and out["mask"].sum(1).tolist() == [12, 12]
    for k in ("loss", "mim_loss", "sr_loss", "mlm_loss"):
        assert torch.isfinite(out[k]) and out[k].ndim == 0
    assert torch.allclose(out["loss"], out["mim_loss"] + out["sr_loss"] + out["mlm_loss"])


def test_losses_match_hand_computation(tiny):
    cfg = tiny.config
    batch, noise = pretrain_batch(cfg), _noise(cfg)
    out = tiny(batch, noise=noise)
    # encoder input: the authors' torchvision tensor Resize (bicubic, no antialias)
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    imgs = TF.resize(batch["image"], [cfg.img_size], interpolation=InterpolationMode.BICUBIC, antialias=False)
    p, g = cfg.patch_size, cfg.grid
    keep = int(g * g * (1 - cfg.mask_ratio))
    recon = out["reconstruction"]
    mim = 0.0
    for b in range(B):
        kept = set(torch.argsort(noise[b])[:keep].tolist())  # the smallest noise is kept, as in MAE
        assert out["mask"][b].nonzero().flatten().tolist() == sorted(set(range(g * g)) - kept)
        for k in range(g * g):
            if k in kept:
                continue
            r, c = divmod(k, g)
            sl = (b, slice(None), slice(r * p, (r + 1) * p), slice(c * p, (c + 1) * p))
            mim += ((recon[sl] - imgs[sl]) ** 2).sum().item()
    mim /= imgs.numel()  # the authors average over every pixel, zeros outside the mask included
    assert out["mim_loss"].item() == pytest.approx(mim, rel=1e-5)
    # the SR head, computed here from its definition: bilinear x2, conv -> ReLU -> conv, + residual, ReLU
    head = tiny.super_res
    up = F.interpolate(recon, scale_factor=2, mode="bilinear", align_corners=False)
    mid = F.relu(F.conv2d(up, head.conv1.weight, head.conv1.bias, padding=1))
    expected_sr = F.relu(F.conv2d(mid, head.conv2.weight, head.conv2.bias, padding=1) + up)
    assert torch.allclose(out["sr"], expected_sr, atol=1e-5)
    # only the CLS token and the visible patches reach the text side
    assert tiny.forward_encoder(imgs, cfg.mask_ratio, noise)[0].shape[1] == 1 + keep
    sr, big, cell, w = out["sr"], batch["image"], 2 * p, cfg.sr_window
    srl = 0.0
    for b in range(B):
        top, left = batch["sr_window"][b].tolist()
        sl = (b, slice(None), slice(top * cell, (top + w) * cell), slice(left * cell, (left + w) * cell))
        srl += ((sr[sl] - big[sl]) ** 2).sum().item()
    srl /= big.numel()
    assert out["sr_loss"].item() == pytest.approx(srl, rel=1e-5)
    logp = torch.log_softmax(out["logits"].double(), -1)
    nll = -logp.gather(-1, batch["labels"][..., None]).squeeze(-1)
    mlm = (nll * batch["weights"].double()).mean()  # every position, padding included
    assert out["mlm_loss"].item() == pytest.approx(mlm.item(), rel=1e-5)


def test_noise_fixes_masking_and_options_change_losses(tiny):
    cfg = tiny.config
    batch = pretrain_batch(cfg)
    a, b = tiny(batch, noise=_noise(cfg, 1)), tiny(batch, noise=_noise(cfg, 1))
    c = tiny(batch, noise=_noise(cfg, 2))
    assert torch.equal(a["loss"], b["loss"]) and not torch.equal(a["mim_loss"], c["mim_loss"])
    region = ECAMPPretrainModel(ECAMPPretrainConfig.tiny(pixel_loss_over_region=True)).eval()
    region.load_state_dict(tiny.state_dict())
    r = region(batch, noise=_noise(cfg, 1))
    assert r["mim_loss"].item() == pytest.approx(a["mim_loss"].item() / cfg.mask_ratio, rel=1e-5)
    assert r["sr_loss"].item() == pytest.approx(a["sr_loss"].item() * (cfg.grid / cfg.sr_window) ** 2, rel=1e-5)
    no_relu = ECAMPPretrainModel(ECAMPPretrainConfig.tiny(sr_final_relu=False)).eval()
    no_relu.load_state_dict(tiny.state_dict())
    assert no_relu(batch, noise=_noise(cfg, 1))["sr"].min() < 0 <= a["sr"].min()


def test_every_trainable_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = ECAMPPretrainModel(ECAMPPretrainConfig.tiny()).train()
    out = model(pretrain_batch(model.config))
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert sorted(frozen) == ["decoder_pos_embed", "encoder.pos_embed"]  # fixed sin-cos, as the authors


def test_default_config_is_the_authors():
    cfg = ECAMPPretrainConfig()
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.decoder_embed_dim, cfg.decoder_depth,
            cfg.decoder_num_heads) == (768, 12, 12, 512, 4, 16)
    assert (cfg.vocab_size, cfg.text_hidden_size, cfg.text_layers, cfg.text_heads, cfg.text_intermediate_size,
            cfg.max_text_len) == (30000, 768, 6, 6, 1536, 256)
    assert cfg.sr_img_size == 448 and cfg.grid == 14 and cfg.sr_window == 12 and cfg.mask_ratio == 0.75
    pe = sincos_pos_embed_2d(768, 14)
    assert pe.shape == (1, 197, 768) and pe[0, 0].abs().sum() == 0


def test_bad_batches_are_refused(tiny):
    cfg = tiny.config
    bad = pretrain_batch(cfg)
    bad["sr_window"] = torch.tensor([[0, 2], [0, 0]])  # 2 + 3 > 4 cells: the authors silently truncated
    with pytest.raises(BatchError, match="sr_window"):
        tiny(bad)
    bad = pretrain_batch(cfg)
    bad["image"] = bad["image"][:, :, :64, :64]
    with pytest.raises(BatchError, match="image"):
        tiny(bad)
    bad = pretrain_batch(cfg)
    del bad["weights"]
    with pytest.raises(BatchError, match="weights"):
        tiny(bad)


def test_exported_encoder_gives_identical_features(tiny, tmp_path):
    enc = encoder_for(tiny, "cxr-vit-b")
    ecamp.save_pretrained(enc, tmp_path / "enc")
    loaded = ecamp.load(f"local-dir:{tmp_path / 'enc'}")
    x = torch.randn(2, 3, tiny.config.img_size, tiny.config.img_size)
    with torch.no_grad():
        inside = tiny.encoder.forward_features(x)
        assert torch.equal(inside, loaded.forward_features(x))
        assert torch.equal(tiny.encoder(x), loaded(x))
    assert loaded.pretrained_cfg["mean"] == pytest.approx([0.4722] * 3)
    assert loaded.ecamp_cfg.modality == "cxr" and loaded.pos_embed.requires_grad


def _authors_layout(model: ECAMPPretrainModel) -> dict[str, torch.Tensor]:
    """The documented key names of the authors' released checkpoint (dossier section 8), written out here
    independently of the library's mapping; the fusion layer under its released name ``cross_attn_layer``."""
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith("encoder."):
            key = key[len("encoder."):]
        elif key.startswith("text.embeddings."):
            key = "bert_encoder.model.bert.embeddings." + key[len("text.embeddings."):]
        elif key.startswith("text.context_fusion_layer."):
            key = "bert_encoder.model.bert.cross_attn_layer." + key[len("text.context_fusion_layer."):]
        elif key.startswith("text.encoder."):
            key = "bert_encoder.model.bert.encoder." + key[len("text.encoder."):]
        elif key.startswith("text.cls."):
            key = "bert_encoder.model.cls." + key[len("text.cls."):]
        out[key] = value.clone()
    hidden = model.config.text_hidden_size
    out["bert_encoder.model.bert.pooler.dense.weight"] = torch.zeros(hidden, hidden)  # built but unused by the authors
    out["bert_encoder.model.bert.pooler.dense.bias"] = torch.zeros(hidden)
    return out


def test_authors_checkpoint_round_trip(tiny, tmp_path):
    state = _authors_layout(tiny)
    assert {"patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "norm.weight",
            "mask_token", "decoder_embed.weight", "decoder_pos_embed", "decoder_blocks.0.mlp.fc1.weight",
            "decoder_norm.weight", "decoder_pred.weight", "super_res.conv1.weight", "bert_mlp.weight",
            "bert_encoder.model.bert.cross_attn_layer.cross_self_attention.query.weight",
            "bert_encoder.model.bert.cross_attn_layer.gap_mlp.weight",
            "bert_encoder.model.bert.cross_attn_layer.out_layer.dense.weight",
            "bert_encoder.model.bert.encoder.layer.1.attention.self.key.weight",
            "bert_encoder.model.cls.predictions.decoder.weight",
            "bert_encoder.model.cls.predictions.bias"} <= set(state)
    ckpt = {"model": state, "optimizer": {"state": {}, "param_groups": []}, "epoch": 119,
            "scaler": {"scale": 65536.0}, "args": argparse.Namespace(lr=1.5e-4, batch_size=256)}
    path = tmp_path / "ECAMP_ViT_Base_16.pth"
    torch.save(ckpt, path)
    cfg = tiny.config
    loaded = ECAMPPretrainModel.from_authors(path, config=cfg).eval()
    for k, v in tiny.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    batch, noise = pretrain_batch(cfg), _noise(cfg)
    a, b = tiny(batch, noise=noise), loaded(batch, noise=noise)
    assert all(torch.equal(a[k], b[k]) for k in ("loss", "mim_loss", "sr_loss", "mlm_loss"))
    # the bare state dict and the later `context_fusion_layer` spelling load too
    renamed = {k.replace("cross_attn_layer", "context_fusion_layer"): v for k, v in state.items()}
    ECAMPPretrainModel.from_authors(renamed, config=cfg)
    assert set(tiny.to_authors_state_dict()) == {k.replace("cross_attn_layer", "context_fusion_layer")
                                                   for k in state if ".pooler." not in k}
    # strict: a missing block or the wrong size is an error, not a silent partial load
    broken = dict(state)
    del broken["blocks.1.mlp.fc2.weight"]
    with pytest.raises(WeightsMismatchError, match="blocks.1.mlp.fc2.weight"):
        ECAMPPretrainModel.from_authors(broken, config=cfg)
    with pytest.raises(WeightsMismatchError, match="mis-shaped"):
        ECAMPPretrainModel.from_authors(state, config=ECAMPPretrainConfig.tiny(text_intermediate_size=96))


class Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoints_are_never_unpickled_freely(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {}, "extra": Payload()}, path)
    with pytest.raises(InvalidWeightsFileError, match="weights_only"):
        read_authors_checkpoint(path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InvalidWeightsFileError):
        read_authors_checkpoint(tmp_path / "junk.pth")


def test_convert_cli_fills_the_local_store(tiny, tmp_path):
    from ecamp.hub import local_store_path

    path = tmp_path / "ckpt.pth"
    torch.save({"model": _authors_layout(tiny), "args": argparse.Namespace(epochs=120)}, path)
    cfg_json = tmp_path / "tiny.json"
    cfg_json.write_text(json.dumps(tiny.config.to_dict()))
    store = local_store_path("vit_base_patch16_224.ecamp_mimic_cxr")
    try:
        out = subprocess.run([sys.executable, "-m", "ecamp", "convert", str(path), "--name", "cxr-vit-b",
                              "--config", str(cfg_json)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["out"] == str(store)
        model = ecamp.load("cxr-vit-b", local_files_only=True)
        x = torch.randn(1, 3, 64, 64)
        with torch.no_grad():
            assert torch.equal(model.forward_features(x), tiny.encoder.forward_features(x))
    finally:
        import shutil

        shutil.rmtree(store, ignore_errors=True)


@pytest.mark.slow
def test_full_size_forward_backward():
    torch.manual_seed(0)
    model = ECAMPPretrainModel()
    cfg = model.config
    assert sum(p.numel() for p in model.encoder.parameters()) == 85_798_656  # timm ViT-B/16 without head
    batch = {"image": torch.randn(1, 3, 448, 448), "input_ids": torch.randint(5, 30000, (1, 256)),
             "labels": torch.randint(5, 30000, (1, 256)), "attention_mask": torch.ones(1, 256, dtype=torch.long),
             "token_type_ids": torch.zeros(1, 256, dtype=torch.long), "weights": torch.ones(1, 256),
             "sr_window": torch.tensor([[1, 2]])}
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and out["mask"].sum() == 147 and cfg.grid == 14
    assert out["reconstruction"].shape == (1, 3, 224, 224) and out["sr"].shape == (1, 3, 448, 448)
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None


def test_full_model_folder_round_trip_and_store(tiny, tmp_path):
    from ecamp.errors import WeightsNotPublishedError
    from ecamp.hub import local_store_path
    from ecamp.text import train_tokenizer

    tok = train_tokenizer(["small left pleural effusion.", "no pneumothorax."] * 5, vocab_size=60, min_frequency=1)
    files = ecamp.save_pretrained(tiny, tmp_path / "full", tokenizer=tok)["files"]
    assert [f["path"] for f in files] == ["config.json", "model.safetensors", "tokenizer.json", "README.md"]
    again = ecamp.load_pretrain(tmp_path / "full").eval()
    batch, noise = pretrain_batch(tiny.config), _noise(tiny.config)
    assert torch.equal(again(batch, noise=noise)["loss"], tiny(batch, noise=noise)["loss"])
    with pytest.raises(WeightsNotPublishedError, match="ecamp convert"):
        ecamp.load_pretrain("cxr-ecamp-b-pretrain")
    # `ecamp convert ... --name cxr-ecamp-b-pretrain` fills the store that load_pretrain(name) reads
    path = tmp_path / "ckpt.pth"
    torch.save({"model": _authors_layout(tiny)}, path)
    (tmp_path / "tiny.json").write_text(json.dumps(tiny.config.to_dict()))
    tok.save(str(tmp_path / "tok.json"))
    store = local_store_path("ecamp_vit_base_patch16.mimic_cxr_pretrain")
    try:
        out = subprocess.run([sys.executable, "-m", "ecamp", "convert", str(path), "--name", "cxr-ecamp-b-pretrain",
                              "--config", str(tmp_path / "tiny.json"), "--tokenizer", str(tmp_path / "tok.json")],
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        stored = ecamp.load_pretrain("cxr-ecamp-b-pretrain").eval()
        assert torch.equal(stored(batch, noise=noise)["loss"], tiny(batch, noise=noise)["loss"])
        assert (store / "tokenizer.json").is_file() and stored.ecamp_cfg.modality == "cxr"
    finally:
        import shutil

        shutil.rmtree(store, ignore_errors=True)
