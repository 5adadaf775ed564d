"""Same inputs and seed, same run: tokenizer training, pre-training and fine-tuning (every head) repeat exactly on
the CPU, each run in its own process (with its own hash seed); deterministic mode runs; process groups and
DataLoader workers do not outlive the call that made them."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ecamp.train.common.checkpoint import latest_checkpoint, load_checkpoint
from ecamp.train.common.lists import read_table
from ecamp.train.phantom import (
    write_phantom,
    write_phantom_classification,
    write_phantom_detection,
    write_phantom_segmentation,
)

from helpers.builders import TINY_RUN

# the tiny pre-training config, but the run trains its own tokenizer (model.vocab_size=256: a full vocabulary)
OVERRIDES = [o for o in TINY_RUN if not o.startswith("data.tokenizer")]


def _run(args: list[str], hash_seed: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python args`` in a new process with this one's number of intra-op threads (it sets how CPU kernels split
    their sums, and so the last bits of a result) and its own hash seed."""
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _rows(folder: Path, drop: tuple[str, ...] = ("elapsed_s",)) -> list[dict]:
    rows = [json.loads(ln) for ln in (folder / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> Path:
    return write_phantom(tmp_path_factory.mktemp("phantom"), 24, seed=3, size=96)


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> Path:
    """48 phantom reports with their context, as the pre-training loop feeds them to the tokenizer, in a JSON list."""
    root = write_phantom(tmp_path_factory.mktemp("reports"), 48, seed=0, size=32)
    rows = read_table(root / "mimic-cxr-2.0.0-entity-llm.csv", ["report", "llm_output"])
    path = root / "texts.json"
    path.write_text(json.dumps([r["report"] + " " + (r["llm_output"] or "") for r in rows]))
    return path


TRAIN = ("import json, sys\n"
         "from ecamp.text import train_tokenizer\n"
         "texts = json.load(open(sys.argv[1]))\n"
         "train_tokenizer(texts, vocab_size=int(sys.argv[3])).save(sys.argv[2])\n")


def test_tokenizer_training_is_byte_identical_in_separate_processes(reports, tmp_path):
    from tokenizers import decoders

    from ecamp.text import SPECIAL_TOKENS, load_tokenizer

    files = {}
    for vocab_size in (30000, 200):  # 30000: training stops at min_frequency; 200: cut among equal counts
        for seed in ("1", "2"):
            files[vocab_size, seed] = tmp_path / f"tok-{vocab_size}-{seed}.json"
            _run(["-c", TRAIN, str(reports), str(files[vocab_size, seed]), str(vocab_size)], seed)
        assert files[vocab_size, "1"].read_bytes() == files[vocab_size, "2"].read_bytes(), vocab_size
    free, full = load_tokenizer(files[30000, "1"]), load_tokenizer(files[200, "1"])
    assert 200 < free.get_vocab_size() < 30000 and full.get_vocab_size() == 200
    texts = json.loads(reports.read_text())
    for tok in (free, full):
        assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
        # every report comes back from its pieces: no [UNK], no lost character
        for text in texts:
            words = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text))]
            enc = tok.encode(text)
            assert 1 not in enc.ids
            assert decoders.WordPiece(cleanup=False).decode(enc.tokens) == " ".join(words)


def test_ties_follow_the_documented_rule():
    from ecamp.text import SPECIAL_TOKENS, train_tokenizer

    def vocab(**kw):
        tok = train_tokenizer(["ab cd ef"], min_frequency=1, **kw)
        return [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])][len(SPECIAL_TOKENS):]

    # three pairs of count 1: the one whose left piece has the smallest id is merged first
    assert vocab(vocab_size=15) == ["a", "b", "c", "d", "e", "f", "##b", "##d", "##f", "ab"]
    assert vocab(vocab_size=16)[-2:] == ["ab", "cd"]
    # six characters of equal frequency, room for five: the smaller code points stay, 'f' leaves its word
    assert vocab(vocab_size=30, limit_alphabet=5) == ["a", "b", "c", "d", "e", "##b", "##d", "ab", "cd"]


def _pretrain(data: Path, out: Path, hash_seed: str, *extra: str) -> Path:
    _run(["-m", "ecamp.train", "pretrain", "--data-root", str(data), "--output-dir", str(out), "--max-steps", "3",
          "--no-progress", *OVERRIDES, *extra], hash_seed)
    return out


@pytest.fixture(scope="module")
def reference_run(phantom, tmp_path_factory) -> tuple[Path, list]:
    """A pre-training run in this process, with two DataLoader workers; the child processes left after it."""
    from ecamp.train.pretrain.config import load_config
    from ecamp.train.pretrain.loop import pretrain

    out = tmp_path_factory.mktemp("pretrain") / "a"
    pretrain(load_config(None, OVERRIDES + ["run.num_workers=2"]), phantom, out, max_steps=3, progress=False)
    return out, multiprocessing.active_children()


def test_pretraining_twice_is_the_same_run(phantom, reference_run, tmp_path):
    a, b = reference_run[0], _pretrain(phantom, tmp_path / "b", "2", "run.num_workers=2")
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert len(json.loads((a / "tokenizer.json").read_text())["model"]["vocab"]) == 256  # full: ties were cut
    assert [r["step"] for r in _rows(a)] == [1, 2, 3] and _rows(a) == _rows(b)
    assert (a / "metrics.csv").read_bytes() == (b / "metrics.csv").read_bytes()
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    ca, cb = load_checkpoint(latest_checkpoint(a)), load_checkpoint(latest_checkpoint(b))
    assert ca["step"] == cb["step"] == 3 and _same_tensors(ca["model"], cb["model"])


def test_no_dataloader_worker_outlives_a_run(reference_run):
    assert reference_run[1] == []


def test_deterministic_mode_runs_on_the_cpu(phantom, reference_run, tmp_path):
    det = _pretrain(phantom, tmp_path / "det", "3", "run.deterministic=true")
    assert json.loads((det / "config.json").read_text())["run"]["deterministic"] is True
    ref, got = _rows(reference_run[0]), _rows(det)
    assert [r["step"] for r in got] == [1, 2, 3]
    for r, g in zip(ref, got, strict=True):
        assert g["loss"] == pytest.approx(r["loss"], rel=1e-5, abs=1e-6)


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("downstream")
    return {"cls": write_phantom_classification(base / "cls", 80, seed=11, size=64),
            "seg": write_phantom_segmentation(base / "seg", 40, seed=2, size=64),
            "det": write_phantom_detection(base / "det", 40, seed=3, size=64)}


HEAD_ARGS = {
    "cls": ["--dataset", "phantom", "--mode", "linear-probe", "--max-steps", "2", "--batch-size", "16",
            "--eval-every", "1", "--lr", "0.05", "--warmup", "1", "--num-workers", "2"],
    "seg": ["--head", "seg", "--dataset", "phantom-seg", "--max-steps", "2", "--batch-size", "8", "--eval-every",
            "1", "--warmup", "1", "--num-workers", "0"],
}


def _detect(data: str, out: str, model: str) -> None:
    """The detector through the Python API (the command line builds the authors' neck, widths 512-2048: slow)."""
    from ecamp.train.downstream.detection import finetune_detection
    from ecamp.train.downstream.recipes import recipe

    r = recipe("det", "phantom-det", 100).replace(steps=2, batch_size=4, warmup=1, eval_every=1, start_eval=0)
    finetune_detection("phantom-det", 100, data, out, model_name=model, recipe=r, widths=(32, 64, 128),
                       head_width=64, num_workers=0, progress=False)


DETECT = inspect.getsource(_detect) + "\nimport sys\n_detect(*sys.argv[1:4])\n"


@pytest.mark.parametrize("head", ["cls", "seg", "det"])
def test_finetuning_twice_is_the_same_run(head, downstream, tiny_folder, tmp_path):
    from ecamp.train.cli import main

    a, b, model = tmp_path / "a", tmp_path / "b", f"local-dir:{tiny_folder}"
    if head == "det":
        _detect(str(downstream[head]), str(a), model)  # this process
        _run(["-c", DETECT, str(downstream[head]), str(b), model], "1")
    else:
        args = ["finetune", "--data-root", str(downstream[head]), "--model", model, "--no-progress", *HEAD_ARGS[head]]
        assert main([*args, "--output-dir", str(a)]) == 0  # this process
        _run(["-m", "ecamp.train", *args, "--output-dir", str(b)], "1")  # another, with its own hash seed
    assert [r["step"] for r in _rows(a, drop=())] == [1, 2]
    assert (a / "metrics.jsonl").read_bytes() == (b / "metrics.jsonl").read_bytes()
    assert json.loads((a / "metrics.json").read_text()) == json.loads((b / "metrics.json").read_text())
    from safetensors.torch import load_file

    assert _same_tensors(load_file(a / "best" / "model.safetensors"), load_file(b / "best" / "model.safetensors"))
    assert (a / "best" / "config.json").read_bytes() == (b / "best" / "config.json").read_bytes()


def test_finetune_deterministic_flag_runs_on_the_cpu(downstream, tiny_folder, tmp_path):
    _run(["-m", "ecamp.train", "finetune", "--data-root", str(downstream["seg"]), "--output-dir", str(tmp_path),
          "--model", f"local-dir:{tiny_folder}", "--no-progress", "--deterministic", *HEAD_ARGS["seg"]], "1")
    assert [r["step"] for r in _rows(tmp_path, drop=())] == [1, 2]


GROUP = ("import atexit, os, sys, torch.distributed as dist\n"
         "from pathlib import Path\n"
         "# registered first, so it runs after ecamp's exit handler (last in, first out)\n"
         "atexit.register(lambda: Path(sys.argv[1], 'exit' + os.environ['RANK']).write_text(\n"
         "    'open' if dist.is_initialized() else 'closed'))\n"
         "from ecamp.train.common.distributed import setup_runtime\n"
         "rt = setup_runtime('cpu')\n"
         "Path(sys.argv[1], f'joined{rt.rank}').write_text(str(rt.world))\n")


def test_a_process_group_ecamp_opens_is_closed_at_exit(tmp_path):
    # as pretrain() or finetune_*() called from Python and never destroyed by the caller
    script = tmp_path / "group.py"
    script.write_text(GROUP)
    _run(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path)], "1",
         timeout=300)
    assert (tmp_path / "joined0").read_text() == (tmp_path / "joined1").read_text() == "2"
    assert (tmp_path / "exit0").read_text() == (tmp_path / "exit1").read_text() == "closed"


@pytest.mark.slow
def test_the_demo_twice_is_the_same_run(tmp_path):
    # the whole offline demo, small: phantom data, tokenizer, pre-training, export, probes
    code = ("import sys; from ecamp.train.demo import run_demo; "
            "run_demo(sys.argv[1], n_pretrain=96, n_probe=200, max_steps=3, progress=False, echo=lambda *a: None)")
    outs = [tmp_path / "a", tmp_path / "b"]
    for out, seed in zip(outs, ("5", "6"), strict=True):
        done = _run(["-c", code, str(out)], seed)
        assert done.returncode == 0, done.stderr
    a, b = outs
    assert (a / "run" / "tokenizer.json").read_bytes() == (b / "run" / "tokenizer.json").read_bytes()
    assert _rows(a / "run") == _rows(b / "run")
    for name in ("encoder/model.safetensors", "pretrain/model.safetensors"):
        assert (a / "export" / name).read_bytes() == (b / "export" / name).read_bytes(), name
