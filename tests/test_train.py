"""ecamp.train: configs, the data reader, exact resume after a kill, DDP against a single process, export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ecamp
from ecamp.train.phantom import write_phantom
from ecamp.train.pretrain.config import ConfigError, load_config
from ecamp.train.pretrain.data import DataError, PretrainDataset, ResumableSampler, map_window

from helpers.builders import TINY_RUN

ROOT = Path(__file__).resolve().parents[1]
TINY = TINY_RUN  # a very small run: 64-px encoder input on a 4x4 grid, text of 32 tokens


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    root = write_phantom(tmp_path_factory.mktemp("phantom"), 24, seed=3, size=96)
    # one tokenizer trained once for every run of this module (training it is repeatable, but takes time)
    from ecamp.text import train_tokenizer

    rows = (root / "mimic-cxr-2.0.0-entity-llm.csv").read_text().splitlines()[1:]
    train_tokenizer(rows, vocab_size=256, min_frequency=1).save(str(root / "tokenizer.json"))
    return root


def test_presets_load_and_defaults_are_the_authors():
    mimic = load_config(ROOT / "configs/pretrain/mimic_cxr.yaml")
    assert mimic.optim.lr == 1.5e-4 and mimic.optim.batch_size * mimic.optim.accum_iter * 4 == 8192
    assert (mimic.optim.epochs, mimic.optim.warmup_epochs, mimic.optim.schedule_epochs) == (120, 40, 200)
    assert mimic.optim.betas == (0.9, 0.95) and mimic.data.crop_scale == (0.2, 1.0)
    assert mimic.model.embed_dim == 768 and mimic.masking().mask_prob == 0.70
    load_config(ROOT / "configs/pretrain/ffa_ir.yaml")
    from ecamp.train.demo import demo_config

    assert load_config(ROOT / "configs/pretrain/phantom_tiny.yaml").to_dict() == demo_config().to_dict()


@pytest.mark.parametrize("overrides, message", [
    (["optim.lr=-1"], "optim.lr"),
    (["optim.lrr=1"], r"optim: unknown keys \['lrr'\]"),
    (["run.precision=fp8"], "precision"),
    (["optim.batch_size=two"], "expected an integer"),
    (["data.crop_scale=[0.5]"], "list of 2"),
    (["model.sr_window=99"], "sr_window"),
    (["text.mask_probb=0.5"], "mask_probb"),
    (["nonsense"], "key.sub=value"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_schedule_follows_the_authors():
    from ecamp.train.pretrain.loop import lr_at

    cfg = load_config(ROOT / "configs/pretrain/mimic_cxr.yaml")
    assert lr_at(0, cfg) == 0 and lr_at(20, cfg) == pytest.approx(0.75e-4)
    assert lr_at(40, cfg) == pytest.approx(1.5e-4)
    assert lr_at(120, cfg) == pytest.approx(0.75e-4)  # half the peak where the authors stop: horizon 200


def test_dataset_reads_the_layout_and_is_deterministic(phantom, tmp_path):
    from ecamp.text import ReportEncoder, train_tokenizer

    cfg = load_config(None, TINY)
    rows = (phantom / "mimic-cxr-2.0.0-entity-llm.csv").read_text().splitlines()
    tok = train_tokenizer([r for r in rows[1:]], vocab_size=256, min_frequency=1)
    ds = PretrainDataset(phantom, cfg, ReportEncoder(tok, max_length=32), seed=1)
    a, b = ds[3], ds[3]
    assert a["image"].shape == (3, 64, 64) and a["input_ids"].shape == (32,) and a["noise"].shape == (16,)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ds.set_epoch(1)
    assert not torch.equal(ds[3]["image"], a["image"])
    assert 0 <= int(a["sr_window"].min()) and int(a["sr_window"].max()) <= 1
    assert map_window((2, 0), 14, 12) == (2, 0) and map_window((2, 1), 4, 3) == (1, 0)
    # errors: missing columns, misaligned windows, unreadable images are samples with an error
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "mimic-cxr-2.0.0-entity-llm.csv").write_text("img_path,report\nx.png,hello\n")
    with pytest.raises(DataError, match="llm_output"):
        PretrainDataset(bad, cfg, ReportEncoder(tok, max_length=32))
    (bad / "mimic-cxr-2.0.0-entity-llm.csv").write_text("img_path,report,llm_output\nx.png,hello,\ny.png,,\n")
    (bad / "mimic-cxr-2.0.0-attn-label.csv").write_text("label_i,label_j\n0,0\n")
    with pytest.raises(DataError, match="matched by row"):
        PretrainDataset(bad, cfg, ReportEncoder(tok, max_length=32))
    (bad / "mimic-cxr-2.0.0-attn-label.csv").write_text("label_i,label_j\n0,0\n1,5\n")
    with pytest.raises(DataError, match="outside 0..2"):
        PretrainDataset(bad, cfg, ReportEncoder(tok, max_length=32))
    (bad / "mimic-cxr-2.0.0-attn-label.csv").write_text("label_i,label_j\n0,0\n1,1\n")
    ds_bad = PretrainDataset(bad, cfg, ReportEncoder(tok, max_length=32))
    assert "x.png" in ds_bad[0]["error"] and "error" in ds_bad[1]


def test_sampler_splits_and_resumes():
    full = list(ResumableSampler(10, seed=0))
    r0, r1 = list(ResumableSampler(10, rank=0, world_size=2, seed=0)), list(ResumableSampler(10, rank=1,
                                                                                             world_size=2, seed=0))
    assert sorted(r0 + r1) == sorted(full) and r0 == full[0::2] and r1 == full[1::2]
    s = ResumableSampler(10, seed=0)
    s.set_epoch(0, start=4)
    assert list(s) == full[4:]
    s.set_epoch(1)
    assert list(s) != full


def _run_script(code: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_kill_and_resume_gives_the_same_losses(phantom, tmp_path):
    args = ["pretrain", "--data-root", str(phantom), "--no-progress", *TINY]
    ref = subprocess.run([sys.executable, "-m", "ecamp.train", *args, "--output-dir", str(tmp_path / "ref")],
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr
    # the same run, killed (SIGKILL) in its 5th optimizer step, after the checkpoint of step 4
    killer = (
        "import os, signal, sys, torch\n"
        "real = torch.optim.AdamW.step\n"
        "calls = [0]\n"
        "def step(self, *a, **k):\n"
        "    calls[0] += 1\n"
        "    if calls[0] == 5:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(self, *a, **k)\n"
        "torch.optim.AdamW.step = step\n"
        "from ecamp.train.cli import main\n"
        f"sys.exit(main({[*args, '--output-dir', str(tmp_path / 'run')]!r}))\n"
    )
    killed = _run_script(killer)
    assert killed.returncode == -9, killed.stderr
    names = sorted(p.name for p in (tmp_path / "run").glob("checkpoint-*.pt"))
    assert names == ["checkpoint-00000002.pt", "checkpoint-00000004.pt"]
    resumed = subprocess.run([sys.executable, "-m", "ecamp.train", *args, "--output-dir", str(tmp_path / "run"),
                              "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    assert [m["step"] for m in b] == [m["step"] for m in a] == list(range(1, len(a) + 1))
    for x, y in zip(a, b, strict=True):
        assert (x["loss"], x["mim_loss"], x["sr_loss"], x["mlm_loss"], x["lr"]) == \
            (y["loss"], y["mim_loss"], y["sr_loss"], y["mlm_loss"], y["lr"])
    # keep_last=2
    assert len(list((tmp_path / "run").glob("checkpoint-*.pt"))) == 2


def test_two_process_ddp_matches_one_process(phantom, tmp_path):
    common = ["pretrain", "--data-root", str(phantom), "--no-progress", "--max-steps", "3", *TINY,
              "model.text_dropout=0.0", "optim.accum_iter=1"]
    single = subprocess.run([sys.executable, "-m", "ecamp.train", *common, "--output-dir", str(tmp_path / "one"),
                             "optim.batch_size=8"], capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ecamp.train", *common, "--output-dir", str(tmp_path / "two"), "optim.batch_size=4"],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr
    from ecamp.train.pretrain.loop import load_checkpoint

    one = load_checkpoint(tmp_path / "one" / "checkpoint-00000003.pt")
    two = load_checkpoint(tmp_path / "two" / "checkpoint-00000003.pt")
    assert len(two["rng"]) == 2  # both ranks' RNG states
    for k, v in one["model"].items():
        w = two["model"][k]
        # softmax ignores a key bias: its gradient is zero up to rounding, which Adam's normalisation turns into
        # full-size steps that differ with any summation order; leave key biases out of the comparison
        if k.endswith("key.bias"):
            continue
        if k.endswith("attn.qkv.bias"):  # timm's fused [query, key, value] bias
            d = v.shape[0] // 3
            v, w = torch.cat([v[:d], v[2 * d:]]), torch.cat([w[:d], w[2 * d:]])
        assert torch.allclose(v, w, atol=1e-4, rtol=1e-3), k
    ma, mb = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert np.allclose([m["loss"] for m in ma], [m["loss"] for m in mb], rtol=1e-4)


def test_ddp_ranks_hold_identical_parameters(phantom, tmp_path):
    # every rank checks its parameters against rank 0's with an all-gather at the end of training
    script = tmp_path / "check.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from ecamp.train.pretrain.config import load_config\n"
        "from ecamp.train.pretrain import loop\n"
        "holder = {}\n"
        "real = loop._save\n"
        "def save(out, model, *a, **k):\n"
        "    holder['m'] = model\n"
        "    return real(out, model, *a, **k)\n"
        "loop._save = save\n"
        f"cfg = load_config(None, {TINY!r})\n"
        "try:\n"
        f"    loop.pretrain(cfg, {str(phantom)!r}, {str(tmp_path / 'out')!r}, max_steps=2, progress=False)\n"
        "    flat = torch.cat([p.detach().flatten() for p in holder['m'].parameters()])\n"
        "    got = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]\n"
        "    dist.all_gather(got, flat)\n"
        "    assert all(torch.equal(got[0], g) for g in got), 'ranks differ'\n"
        f"    open({str(tmp_path)!r} + f'/rank{{dist.get_rank()}}.ok', 'w').write('identical')\n"
        "finally:\n"
        "    from ecamp.distributed import destroy_process_group\n"
        "    destroy_process_group()\n"
    )
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "rank0.ok").read_text() == (tmp_path / "rank1.ok").read_text() == "identical"


def test_overfits_one_batch(phantom, tmp_path):
    from ecamp.train.pretrain.loop import pretrain

    cfg = load_config(None, TINY + ["optim.batch_size=8", "optim.accum_iter=1", "optim.epochs=80",
                                    "optim.warmup_epochs=0", "optim.schedule_epochs=80", "optim.lr=3e-3",
                                    "data.crop_scale=[1.0, 1.0]", "data.hflip=false", "text.context_prob=0.0",
                                    "model.text_dropout=0.0", "run.save_every=1000"])
    small = tmp_path / "one-batch"
    small.mkdir()
    lines = (phantom / "mimic-cxr-2.0.0-entity-llm.csv").read_text().splitlines()
    (small / "mimic-cxr-2.0.0-entity-llm.csv").write_text("\n".join(lines[:9]) + "\n")
    wl = (phantom / "mimic-cxr-2.0.0-attn-label.csv").read_text().splitlines()
    (small / "mimic-cxr-2.0.0-attn-label.csv").write_text("\n".join(wl[:9]) + "\n")
    (small / "images").symlink_to(phantom / "images")
    (small / "tokenizer.json").symlink_to(phantom / "tokenizer.json")
    summary = pretrain(cfg, small, tmp_path / "out", progress=False)
    m = _metrics(tmp_path / "out")
    assert summary["step"] == 80 and len(m) == 80
    first, last = np.mean([x["loss"] for x in m[:3]]), np.mean([x["loss"] for x in m[-3:]])
    assert last < 0.5 * first, (first, last)
    assert all(np.isfinite(x["loss"]) for x in m)


def test_export_then_load(phantom, tmp_path):
    from ecamp.train.pretrain.loop import pretrain

    cfg = load_config(None, TINY)
    summary = pretrain(cfg, phantom, tmp_path / "run", max_steps=2, progress=False)
    out = subprocess.run([sys.executable, "-m", "ecamp", "train", "export", str(tmp_path / "run"), "--out",
                          str(tmp_path / "exp"), "--name", "cxr-vit-b"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    entry = json.loads(out.stdout)
    assert {f["path"] for f in entry["encoder"]["files"]} == {"config.json", "model.safetensors", "README.md"}
    assert {f["path"] for f in entry["pretrain"]["files"]} == {"config.json", "model.safetensors", "tokenizer.json",
                                                               "README.md"}
    enc = ecamp.load(f"local-dir:{tmp_path / 'exp' / 'encoder'}")
    full = ecamp.load_pretrain(tmp_path / "exp" / "pretrain")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc.forward_features(x), full.encoder.forward_features(x))
    assert summary["checkpoint"].endswith("checkpoint-00000002.pt")


def test_ffa_ir_converter(tmp_path):
    from ecamp.train.pretrain.data import ffa_ir_to_csv

    ann = {"train": {"case1": {"Image_path": ["c1/1.jpg", "c1/2.jpg"], "En_Report": "Fluorescein leakage."},
                     "case2": {"Image_path": ["c2/1.jpg"], "En_Report": ""}},
           "test": {"case3": {"Image_path": ["c3/1.jpg"], "En_Report": "Normal."}}}
    (tmp_path / "ffair_annotation.json").write_text(json.dumps(ann))
    n = ffa_ir_to_csv(tmp_path / "ffair_annotation.json", tmp_path / "ffa.csv")
    assert n == 2
    lines = (tmp_path / "ffa.csv").read_text().splitlines()
    assert lines[0] == "img_path,report,llm_output" and lines[1] == "c1/1.jpg,Fluorescein leakage.,"
    with pytest.raises(DataError, match="no split 'val'"):
        ffa_ir_to_csv(tmp_path / "ffair_annotation.json", tmp_path / "x.csv", splits=("val",))


def test_sr_window_can_follow_the_crop_and_flip(phantom):
    from ecamp.text import ReportEncoder, load_tokenizer

    enc = ReportEncoder(load_tokenizer(phantom / "tokenizer.json"), max_length=32)
    fixed = PretrainDataset(phantom, load_config(None, TINY), enc, seed=0)
    moving = PretrainDataset(phantom, load_config(None, TINY + ["data.sr_window_follows_augmentation=true"]), enc,
                             seed=0)
    from ecamp.train.pretrain.data import map_window

    differs = 0
    for i in range(len(fixed)):
        a, b = fixed[i], moving[i]
        assert torch.equal(a["image"], b["image"])  # same augmentation either way
        assert tuple(a["sr_window"].tolist()) == map_window(fixed.windows[i], 4, 3)  # the authors: unchanged
        differs += int(not torch.equal(a["sr_window"], b["sr_window"]))
    assert differs > 0


def test_flipped_films_can_swap_the_reports_sides(phantom):
    from ecamp.text import ReportEncoder, load_tokenizer
    from ecamp.train.pretrain.data import swap_sides

    assert swap_sides("Left effusion; right lung clear. LEFT. leftover bright") == \
        "Right effusion; left lung clear. RIGHT. leftover bright"
    tok = load_tokenizer(phantom / "tokenizer.json")
    enc = ReportEncoder(tok, max_length=64)
    plain = PretrainDataset(phantom, load_config(None, TINY), enc, seed=0)
    swapping = PretrainDataset(phantom, load_config(None, TINY + ["data.hflip_swaps_sides=true"]), enc, seed=0)
    left, right = tok.token_to_id("left"), tok.token_to_id("right")
    swapped, with_sides = 0, 0
    for i in range(len(plain)):
        a, b = plain[i], swapping[i]
        assert torch.equal(a["image"], b["image"])  # the same crop and flip either way
        ids_a, ids_b = a["labels"].clone(), b["labels"].clone()
        for ids in (ids_a, ids_b):  # the side words collapsed into one
            ids[ids == right] = left
        assert torch.equal(ids_a, ids_b)  # the texts differ in their side words only
        with_sides += int(bool(((a["labels"] == left) | (a["labels"] == right)).any()))
        swapped += int(not torch.equal(a["labels"], b["labels"]))
    assert 0 < swapped < with_sides  # about half the films are flipped


def test_demo_runs_end_to_end_quickly(tmp_path):
    """The demo's whole path (phantom, pre-training, export, load, probes) on a very small budget. Whether
    pre-training wins is checked at full budget by the slow test below and by `ecamp demo` itself."""
    from ecamp.train.demo import run_demo

    lines = []
    result = run_demo(tmp_path, n_pretrain=64, n_probe=80, max_steps=3, progress=False, echo=lines.append)
    assert result["steps"] == 3
    assert set(result["pretrained"]) == {"effusion", "nodule", "cardiomegaly", "pneumothorax"}
    assert all(0 <= v <= 1 for v in [*result["pretrained"].values(), *result["random"].values()])
    assert any("pre-trained AUROC" in line for line in lines)
    assert (tmp_path / "export" / "encoder" / "model.safetensors").is_file()


@pytest.mark.slow
def test_demo_pretraining_beats_random_init(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ecamp", "demo", "--out", str(tmp_path), "--no-progress"],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout + out.stderr
    mean = [line.split() for line in out.stdout.splitlines() if line.startswith("mean")][0]
    assert float(mean[1]) > float(mean[2]) + 0.05


@pytest.mark.parametrize("overrides, message", [
    (["text.mask_prob=abc"], "text.mask_prob"),
    (["text.mask_prob=1.5"], r"\[0, 1\]"),
    (["text.entities=effusion"], "text.entities: expected a list of strings"),
    (["optim.betas=[2, 3]"], "betas"),
    (["run.num_workers=-2"], "num_workers"),
    (["model.text_heads=5"], "divisible"),
    (["model.patch_size=0"], "positive"),
    (["text=foo"], "one by one"),
])
def test_more_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_refuses_a_used_output_folder_and_clamps_the_schedule(phantom, tmp_path):
    from ecamp.errors import EcampError
    from ecamp.train.pretrain.loop import lr_at, pretrain

    cfg = load_config(None, TINY)
    pretrain(cfg, phantom, tmp_path / "run", max_steps=2, progress=False)
    with pytest.raises(EcampError, match="--resume"):
        pretrain(cfg, phantom, tmp_path / "run", max_steps=2, progress=False)
    long = load_config(None, ["optim.epochs=300"])
    assert lr_at(250, long) == lr_at(200, long) == long.optim.min_lr


def test_ddp_survives_a_rank_whose_batch_is_all_unreadable(tmp_path):
    import shutil

    root = write_phantom(tmp_path / "data", 16, seed=4, size=96)
    from ecamp.text import train_tokenizer

    rows = (root / "mimic-cxr-2.0.0-entity-llm.csv").read_text().splitlines()[1:]
    train_tokenizer(rows, vocab_size=256, min_frequency=1).save(str(root / "tokenizer.json"))
    # rank 1's second batch of 2 (epoch 0, seed 42): both images undecodable (a missing file would stop the run
    # before its first step), so that rank has nothing to train on
    sampler = ResumableSampler(16, rank=1, world_size=2, seed=42)
    second = list(sampler)[2:4]
    paths = [line.split(",")[0] for line in rows]
    for i in second:
        (root / paths[i]).write_bytes(b"not an image")
    shutil.copy(root / "tokenizer.json", tmp_path / "tokenizer.json")
    overrides = [o for o in TINY if not o.startswith(("optim.batch_size", "optim.accum_iter", "run.seed"))]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ecamp.train", "pretrain", "--data-root", str(root), "--output-dir",
                          str(tmp_path / "run"), "--no-progress", "--max-steps", "3", *overrides,
                          "optim.batch_size=2", "optim.accum_iter=1", "run.seed=42", "data.max_bad_samples=5"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = _metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["skipped"] >= 0


def _broken_copy(phantom: Path, dest: Path) -> Path:
    import shutil

    shutil.copytree(phantom, dest)
    return dest


def test_pretraining_checks_every_image_before_its_first_step(phantom, tmp_path, capsys):
    from ecamp.train.cli import main as train_main

    root = _broken_copy(phantom, tmp_path / "data")
    csv_path = root / "mimic-cxr-2.0.0-entity-llm.csv"
    names = [line.split(",")[0] for line in csv_path.read_text().splitlines()[1:]]
    for k in (0, 3, 5, 8, 13, 21):  # CSV lines 2, 5, 7, 10, 15, 23
        (root / names[k]).unlink()
    (root / names[1]).unlink()
    (root / names[1]).mkdir()  # a folder where a file should be
    out = tmp_path / "run"
    args = ["pretrain", "--data-root", str(root), "--output-dir", str(out), "--no-progress", "--max-steps", "1",
            *TINY]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert "7 path(s) in the lists do not name an image file" in err and "... and 2 more" in err
    assert f"{csv_path}:2: {names[0]}: does not exist" in err and f"{csv_path}:3: {names[1]}: is not a regular" in err
    assert f"{csv_path}:10:" in err and f"{csv_path}:15:" not in err  # the first five, in list order
    assert not out.exists()  # nothing half-written: no config.json, tokenizer, metrics or checkpoint


def test_pretraining_reports_bad_window_rows_and_a_missing_tokenizer_up_front(phantom, tmp_path):
    from ecamp.train.pretrain.loop import pretrain

    root = _broken_copy(phantom, tmp_path / "data")
    wpath = root / "mimic-cxr-2.0.0-attn-label.csv"
    lines = wpath.read_text().splitlines()
    lines[3] = lines[3].rsplit(",", 2)[0] + ",x,0"
    lines[6] = lines[6].rsplit(",", 2)[0] + ",1,7"
    wpath.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    with pytest.raises(DataError, match="has 2 bad row") as err:
        pretrain(load_config(None, TINY), root, out, max_steps=1, progress=False)
    assert f"{wpath}:4: window labels must be integers" in str(err.value)
    assert f"{wpath}:7: window (1, 7) is outside 0..2" in str(err.value) and err.value.path == str(wpath)
    with pytest.raises(DataError, match="data.tokenizer"):
        pretrain(load_config(None, TINY + ["data.tokenizer=nope.json"]), phantom, out, max_steps=1, progress=False)
    with pytest.raises(DataError, match="fewer than accum_iter"):
        pretrain(load_config(None, TINY + ["optim.batch_size=16"]), phantom, out, max_steps=1, progress=False)
    assert not out.exists()


def test_cli_logs_the_global_batch_of_pretraining(phantom, tmp_path, caplog):
    from ecamp.train.cli import main as train_main

    # no caplog.at_level: the record is captured only if the command itself logs "ecamp" at INFO
    assert train_main(["pretrain", "--data-root", str(phantom), "--output-dir", str(tmp_path / "run"),
                       "--no-progress", "--max-steps", "1", *TINY]) == 0
    assert "Global batch 8 (optim.batch_size 4 per process x 1 processes x accum_iter 2)" in caplog.text
    assert (tmp_path / "run" / "config.json").is_file() and len(_metrics(tmp_path / "run")) == 1


def test_init_from_a_full_mae_checkpoint_takes_encoder_and_decoder(tmp_path, caplog):
    """The MAE repo's mae_visualize format: encoder keys as timm's, decoder keys as this model's, 8 decoder blocks
    (more than the model has), saved as {"model": state_dict} in a .pth."""
    import logging

    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.train.pretrain.loop import _init_from

    cfg = load_config(None, TINY).model
    torch.manual_seed(1)
    donor = ECAMPPretrainModel(cfg)
    mae = {k: torch.randn_like(v) for k, v in donor.encoder.state_dict().items()}
    mae.update({k: torch.randn_like(v) for k, v in donor.state_dict().items()
                if k.startswith(("decoder_", "mask_token"))})
    for k, v in list(mae.items()):
        if k.startswith("decoder_blocks.0."):  # the decoder blocks the model does not have
            mae[k.replace("decoder_blocks.0.", "decoder_blocks.7.")] = torch.randn_like(v)
    assert {"patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "decoder_embed.weight", "decoder_pos_embed",
            "decoder_blocks.0.attn.qkv.weight", "decoder_norm.weight", "decoder_pred.bias"} <= set(mae)
    torch.save({"model": mae}, tmp_path / "mae_visualize_vit_tiny.pth")
    model = ECAMPPretrainModel(cfg)
    with caplog.at_level(logging.INFO, logger="ecamp"):
        counts = _init_from(model, str(tmp_path / "mae_visualize_vit_tiny.pth"))
    state = model.state_dict()
    for k, v in mae.items():
        if k.startswith("decoder_blocks.7."):
            continue
        assert torch.equal(state[k if k.startswith(("decoder_", "mask_token")) else f"encoder.{k}"], v), k
    n_dec = sum(k.startswith(("decoder_", "mask_token")) and not k.startswith("decoder_blocks.7.") for k in mae)
    assert counts == {"encoder": len(donor.encoder.state_dict()), "decoder": n_dec}
    assert f"({counts['encoder']} encoder, {n_dec} decoder)" in caplog.text


@pytest.mark.slow
def test_every_rank_stops_on_rank_zeros_data_check(phantom, tmp_path):
    root = _broken_copy(phantom, tmp_path / "data")
    name = (root / "mimic-cxr-2.0.0-entity-llm.csv").read_text().splitlines()[4].split(",")[0]
    (root / name).unlink()
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "ecamp.train", "pretrain", "--data-root", str(root), "--output-dir",
                          str(tmp_path / "run"), "--no-progress", "--max-steps", "1", *TINY],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode != 0
    # both ranks print the same one-line error (ranks 1 and 0), naming the CSV line
    assert out.stderr.count(f"mimic-cxr-2.0.0-entity-llm.csv:5: {name}: does not exist") == 2, out.stderr[-3000:]
    assert not (tmp_path / "run").exists()
