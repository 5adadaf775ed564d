"""``ecamp train sr-windows``: windows from a first-stage model, by each rule; on phantoms with a committed first
stage (``scripts/sr_windows_phantom.py train`` makes it), the default rule finds the findings' side."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ecamp
from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
from ecamp.text import ReportEncoder, train_tokenizer
from ecamp.train.phantom import write_phantom
from ecamp.train.pretrain.config import load_config
from ecamp.train.pretrain.data import PretrainDataset
from ecamp.train.pretrain.sr_windows import (
    METHODS,
    best_window,
    compute_windows,
    entity_attention_maps,
    phantom_agreement,
    score_windows,
)

STAGE1 = Path(__file__).parent / "data" / "sr-stage1"


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
    ecamp.save_pretrained(ECAMPPretrainModel(cfg), tmp_path / "stage1", tokenizer=tok)
    out = subprocess.run([sys.executable, "-m", "ecamp", "train", "sr-windows", "--checkpoint",
                          str(tmp_path / "stage1"), "--data", str(root), "--out", str(tmp_path / "w.csv"),
                          "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "11 windows by occlusion, 1 reports without an entity" in out.stdout
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


def _tiny_stage1(tmp_path, reports):
    tok = train_tokenizer(reports * 4, vocab_size=200, min_frequency=1)
    cfg = ECAMPPretrainConfig.tiny(vocab_size=200, img_size=32, patch_size=8, sr_window=3, max_text_len=32)
    torch.manual_seed(0)
    return ECAMPPretrainModel(cfg).eval(), ReportEncoder(tok, max_length=32), cfg


@pytest.mark.parametrize("method", METHODS)
def test_every_method_scores_the_valid_windows_and_leaves_the_model_as_it_was(tmp_path, method):
    reports = ["Large left pleural effusion.", "Small right pneumothorax.", "The lungs are clear."]
    model, enc, cfg = _tiny_stage1(tmp_path, reports)
    pairs = [enc.tokenize(r) for r in reports]
    ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
    att = torch.from_numpy(np.stack([p[1] for p in pairs]))
    films = torch.randn(3, cfg.in_chans, cfg.sr_img_size, cfg.sr_img_size)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    found = score_windows(model, enc, films, ids, att, method=method)
    n = cfg.grid - cfg.sr_window + 1
    assert found.scores.shape == (3, n, n) and found.maps.shape == (3, cfg.grid, cfg.grid)
    assert torch.isfinite(found.scores).all() and found.has_target.tolist() == [True, True, False]
    assert all(0 <= t < n and 0 <= c < n for t, c in found.best())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert model.text.bert_config._attn_implementation == "sdpa"
    assert all(blk.attn.fused_attn == model.encoder.blocks[0].attn.fused_attn for blk in model.encoder.blocks)
    # another film changes the scores: they come from the image
    assert not torch.allclose(score_windows(model, enc, films.flip(-1), ids, att, method=method).scores[:2],
                              found.scores[:2])


def test_occlusion_scores_are_the_likelihood_of_the_words_given_one_window(tmp_path):
    reports = ["Large left pleural effusion."]
    model, enc, cfg = _tiny_stage1(tmp_path, reports)
    ids, att = (torch.from_numpy(a)[None] for a in enc.tokenize(reports[0]))
    films = torch.randn(1, cfg.in_chans, cfg.sr_img_size, cfg.sr_img_size)
    found = score_windows(model, enc, films, ids, att, method="occlusion")
    # by hand for the bottom-right window: only its patches (and their mean) visible, the mentions masked
    from ecamp.grounding import encode_patches, target_positions

    targets = target_positions(enc, ids, att)
    words = [enc.tokenizer.id_to_token(int(i)) for i in ids[0][targets[0]]]
    assert words == ["left", "pleural", "effusion"]  # the entity and its two descriptors
    tokens = encode_patches(model, films).reshape(1, cfg.grid, cfg.grid, -1)
    top = left = cfg.grid - cfg.sr_window
    seen = tokens[:, top:, left:].reshape(1, cfg.sr_window**2, -1)
    masked = torch.where(targets, torch.full_like(ids, enc.mask_id), ids)
    with torch.no_grad():
        logits = model.text(masked, att, torch.zeros_like(ids), seen, seen.mean(1, keepdim=True))
    logp = torch.log_softmax(logits, -1)[0, targets[0]].gather(-1, ids[0][targets[0]][:, None]).sum()
    assert float(found.scores[0, top, left]) == pytest.approx(float(logp), rel=1e-5)


def test_save_maps_draws_the_first_films(tmp_path):
    root = write_phantom(tmp_path / "data", 4, seed=3, size=128, p_finding=0.0, one_of=("effusion",),
                         report="short")
    reports = [r["report"] for r in csv.DictReader(open(root / "mimic-cxr-2.0.0-entity-llm.csv"))]
    tok = train_tokenizer(reports * 4, vocab_size=200, min_frequency=1)
    cfg = ECAMPPretrainConfig.tiny(vocab_size=200, img_size=32, patch_size=8, sr_window=3, max_text_len=32)
    ecamp.save_pretrained(ECAMPPretrainModel(cfg), tmp_path / "stage1", tokenizer=tok)
    compute_windows(tmp_path / "stage1", root, tmp_path / "w.csv", save_maps=tmp_path / "maps", n_maps=3,
                    progress=False)
    pngs = sorted((tmp_path / "maps").iterdir())
    assert len(pngs) == 3 and all(p.suffix == ".png" for p in pngs)
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size[0] > 300 and im.size[1] > 300


# -- the committed first stages on held-out phantoms ------------------------------------------------------------

@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    # scripts/sr_windows_phantom.py: trained on seed 0; these films (seed 1) were never seen
    return write_phantom(tmp_path_factory.mktemp("held") / "data", 120, seed=1, size=128, p_finding=0.0,
                         one_of=("effusion", "pneumothorax"), report="short")


def _windows(stage1, held_out, out):
    cmd = [sys.executable, "-m", "ecamp", "train", "sr-windows", "--checkpoint", str(stage1), "--data",
           str(held_out), "--out", str(out), "--no-progress", "--batch-size", "40"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return phantom_agreement(out, held_out)


def test_windows_of_the_default_rule_lie_on_the_findings_side(held_out, tmp_path):
    got = _windows(STAGE1 / "image", held_out, tmp_path / "w.csv")
    assert got["films"] == 120
    assert got["side"] >= 0.75, got
    assert got["exact"] > got["best_constant"], got


def test_a_first_stage_that_never_saw_its_films_finds_no_side(held_out, tmp_path):
    got = _windows(STAGE1 / "shuffled", held_out, tmp_path / "w.csv")
    assert 0.3 <= got["side"] <= 0.65, got  # chance is 0.5 (a window on neither side counts as a miss)
    assert got["exact"] <= got["best_constant"] + 0.05, got


def test_windows_need_the_films_own_report(held_out, tmp_path):
    # the same films, each with the next film's report: the words' evidence is no longer in the film
    import shutil

    data = tmp_path / "data"
    shutil.copytree(held_out, data)
    path = data / "mimic-cxr-2.0.0-entity-llm.csv"
    rows = list(csv.DictReader(open(path, newline="")))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**rows[(i + 1) % len(rows)], "img_path": r["img_path"]} for i, r in enumerate(rows))
    got = _windows(STAGE1 / "image", data, tmp_path / "w.csv")
    assert 0.3 <= got["side"] <= 0.65, got
