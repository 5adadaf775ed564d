"""``ecamp sr-windows``: windows from a first-stage model's entity-to-patch attention."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
import torch

from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
from ecamp.text import ReportEncoder, train_tokenizer
from ecamp.train.phantom import write_phantom
from ecamp.train.pretrain.config import load_config
from ecamp.train.pretrain.data import PretrainDataset
from ecamp.train.pretrain.sr_windows import best_window, compute_windows, entity_attention_maps


def test_best_window_finds_the_peak_and_stays_in_range():
    m = np.zeros((14, 14))
    m[13, 0] = 1.0
    assert best_window(m, 12) == (2, 0)
    m = np.random.default_rng(0).random((8, 8))
    top, left = best_window(m, 6)
    sums = {(t, c): m[t:t + 6, c:c + 6].sum() for t in range(3) for c in range(3)}
    assert (top, left) == max(sums, key=sums.get)


def test_windows_from_a_first_stage_model(tmp_path):
    root = write_phantom(tmp_path / "data", 12, seed=5, size=128)
    csv_path = root / "mimic-cxr-2.0.0-entity-llm.csv"
    rows = list(csv.DictReader(open(csv_path)))
    rows[0]["report"] = "The lungs are clear. Heart size is normal."  # no entity of the list
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["img_path", "report", "llm_output"])
        w.writeheader()
        w.writerows(rows)
    tok = train_tokenizer([r["report"] for r in rows], vocab_size=200, min_frequency=1)
    cfg = ECAMPPretrainConfig.tiny(vocab_size=200, img_size=32, patch_size=8, sr_window=3, max_text_len=32)
    torch.manual_seed(0)
    ECAMPPretrainModel(cfg).save_pretrained(tmp_path / "stage1", tokenizer=tok)
    out = subprocess.run([sys.executable, "-m", "ecamp", "train", "sr-windows", "--checkpoint",
                          str(tmp_path / "stage1"), "--data", str(root), "--out", str(tmp_path / "w.csv"),
                          "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "11 windows from attention, 1 reports without an entity" in out.stdout
    got = list(csv.DictReader(open(tmp_path / "w.csv")))
    assert [r["img_path"] for r in got] == [r["img_path"] for r in rows]
    assert got[0]["label_i"] == got[0]["label_j"] == "" and got[0]["source"] == "no-entity"
    assert all(0 <= int(r["label_i"]) <= 2 and 0 <= int(r["label_j"]) <= 2 for r in got[1:])
    # the pre-training reader takes this file (joined on img_path); the entity-less image gets the default window
    run = load_config(None, ["model.img_size=32", "model.patch_size=8", "model.sr_window=3", "model.embed_dim=64",
                             "model.num_heads=2",
                             "model.max_text_len=32", "data.windows_csv=" + str(tmp_path / "w.csv")])
    ds = PretrainDataset(root, run, ReportEncoder(tok, max_length=32))
    assert ds.windows[0] is None and all(w is not None for w in ds.windows[1:])
    assert ds[0]["sr_window"].tolist() == [0, 0]  # centre of a 4x4 grid with a 3x3 window


def test_masked_query_reads_the_attention_at_the_entity_positions_with_mask_tokens(tmp_path):
    from ecamp.errors import EcampError

    reports = ["Large left pleural effusion. No pneumothorax.", "The lungs are clear. Heart size is normal."]
    tok = train_tokenizer(reports * 4, vocab_size=200, min_frequency=1)
    cfg = ECAMPPretrainConfig.tiny(vocab_size=200, img_size=32, patch_size=8, sr_window=3, max_text_len=32)
    torch.manual_seed(0)
    model = ECAMPPretrainModel(cfg).eval()
    enc = ReportEncoder(tok, max_length=32)
    pairs = [enc.tokenize(r) for r in reports]
    ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
    att = torch.from_numpy(np.stack([p[1] for p in pairs]))
    tokens = torch.randn(2, cfg.grid**2, cfg.text_hidden_size)
    seen = []
    hook = model.text.embeddings.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].clone()),
                                                       with_kwargs=True)
    maps = {q: entity_attention_maps(model, enc, tokens, ids, att, query=q) for q in ("plain", "masked")}
    hook.remove()
    entity = torch.from_numpy(enc.is_entity)[ids] & (att > 0)
    assert entity[0].sum() == 2 and not entity[1].any()  # effusion, pneumothorax; none in the normal report
    assert torch.equal(seen[0], ids)
    assert (seen[1][entity] == enc.mask_id).all() and torch.equal(seen[1][~entity], ids[~entity])
    for m, has in maps.values():
        assert m.shape == (2, cfg.grid, cfg.grid) and has.tolist() == [True, False]
        # two entity rows of probabilities, each the max over heads: between 1 and the number of heads each
        assert 2 - 1e-4 <= float(m[0].sum()) <= 2 * cfg.text_heads + 1e-4 and m[1].abs().sum() == 0
    assert not torch.allclose(maps["plain"][0], maps["masked"][0])
    assert model.text.context_fusion_layer.last_cross_attention is None
    assert model.text.bert_config._attn_implementation == "sdpa"
    with pytest.raises(EcampError, match="query"):
        entity_attention_maps(model, enc, tokens, ids, att, query="gradient")
    with pytest.raises(EcampError, match="query"):
        compute_windows(tmp_path, tmp_path, tmp_path / "w.csv", query="gradient")
