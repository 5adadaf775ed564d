"""Super-resolution windows on phantoms: train the small first stages, compare the window rules, draw the figure.

    python scripts/sr_windows_phantom.py train --out tests/data/sr-stage1      # ~10 min on 2 CPU cores
    python scripts/sr_windows_phantom.py compare --stage1 tests/data/sr-stage1  # the table of docs/sr-windows.md

``train`` writes two first stages (the demo's model size, CPU-trainable) in ecamp's pre-training folder format:
``image/`` trained on phantom films with one lateralised finding each (effusion or pneumothorax, either side) and
one-sentence reports ("Large left pleural effusion."), and ``shuffled/``, the same run on reports paired with other
films, a model that never saw which film a report belongs to. Neither sees the phantoms' window labels: the SR
window is the centre during the first stage. ``compare`` writes held-out phantoms (another seed), asks each model
whether it reads the side from the image (the masked side word with the film, a blank film and another film), and
scores every window rule: side agreement (the window lies on the finding's side) and exact agreement with the
phantom's true window, next to the best constant window.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

FINDINGS = ("effusion", "pneumothorax")
TRAIN_SEED, HELD_SEED = 0, 1


def write_data(root: Path, n: int, seed: int) -> Path:
    from ecamp.train.phantom import write_phantom

    return write_phantom(root, n, seed=seed, size=128, p_finding=0.0, one_of=FINDINGS, report="short")


def stage1_config(steps: int, save_every: int | None = None):
    from ecamp.text.report import MaskingConfig
    from ecamp.train.demo import demo_config

    cfg = demo_config()
    cfg.model.max_text_len = 24  # one-sentence reports
    cfg.data.hflip = False  # a flipped film would contradict its report's side
    cfg.data.crop_scale = (0.8, 1.0)
    cfg.data.windows_csv = None  # the first stage does not know where the findings are
    cfg.text = dataclasses.replace(cfg.text or MaskingConfig(), context_prob=0.0)
    cfg.optim.epochs = cfg.optim.schedule_epochs = 1000  # max_steps ends the run; the lr stays near its peak
    cfg.optim.warmup_epochs = 1
    # a checkpoint of step k of a longer run is the run with --steps k (the schedule does not depend on the end)
    cfg.run.save_every, cfg.run.keep_last = save_every or steps, 100
    return cfg


def shuffle_pairs(root: Path, seed: int) -> None:
    """Pair every report with another film (a derangement), in place."""
    path = root / "mimic-cxr-2.0.0-entity-llm.csv"
    rows = list(csv.DictReader(open(path, newline="")))
    perm = np.random.default_rng(seed).permutation(len(rows))
    other = np.empty_like(perm)
    other[perm] = np.roll(perm, -1)  # a cycle through a random order: every row takes another row's report
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        for i, r in enumerate(rows):
            w.writerow({**rows[other[i]], "img_path": r["img_path"]})


def cmd_train(args: argparse.Namespace) -> None:
    from ecamp.train.pretrain.export import export_checkpoint
    from ecamp.train.pretrain.loop import pretrain

    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="sr-stage1-") as tmp:
        tmp = args.keep or tmp  # noqa: PLW2901
        for kind in args.kinds.split(","):
            data = write_data(Path(tmp) / kind / "data", args.n, TRAIN_SEED)
            if kind == "shuffled":
                shuffle_pairs(data, TRAIN_SEED)
            t0 = time.time()
            summary = pretrain(stage1_config(args.steps, args.save_every), data, Path(tmp) / kind / "run",
                               max_steps=args.steps, progress=not args.no_progress)
            export_checkpoint(summary["checkpoint"], Path(tmp) / kind / "export", "cxr-vit-b")
            dest = out / kind
            shutil.rmtree(dest, ignore_errors=True)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(Path(tmp) / kind / "export" / "pretrain", dest)
            print(f"{kind}: {summary['step']} steps in {time.time() - t0:.0f} s -> {dest}")


def side_reading(model, enc, films: torch.Tensor, ids: torch.Tensor, att: torch.Tensor, sides: np.ndarray,
                 tok) -> dict[str, float]:
    """How well the masked side word follows the film: AUROC of log p("left") - log p("right") against the true
    side, with the film, a blank film and another film (0.5: the image is not used for the side)."""
    from sklearn.metrics import roc_auc_score

    from ecamp.grounding import encode_patches

    left, right = tok.token_to_id("left"), tok.token_to_id("right")
    pos = torch.tensor([int(((row == left) | (row == right)).nonzero()[0]) for row in ids])
    masked = ids.clone()
    masked[torch.arange(len(ids)), pos] = enc.mask_id
    out = {}
    with torch.no_grad():
        for name, img in (("film", films), ("blank film", torch.zeros_like(films)), ("another film", films.roll(1, 0))):
            t = encode_patches(model, img)
            logits = model.text(masked, att, torch.zeros_like(ids), t, t.mean(1, keepdim=True))
            logits = logits[torch.arange(len(ids)), pos]
            out[name] = float(roc_auc_score(sides == "left", (logits[:, left] - logits[:, right]).numpy()))
    return out


def evaluate(stage1: Path, held: Path, methods, n: int, save_maps: Path | None = None) -> dict:
    from ecamp.text import ReportEncoder
    from ecamp.train.pretrain.data import read_film
    from ecamp.train.pretrain.sr_windows import load_stage1, score_windows
    from ecamp.train.pretrain.windows import to_authors

    model, tok, data = load_stage1(stage1)
    cfg = model.config
    enc = ReportEncoder(tok, max_length=cfg.max_text_len)
    reports = list(csv.DictReader(open(held / "mimic-cxr-2.0.0-entity-llm.csv", newline="")))[:n]
    labels = {r["img_path"]: r for r in csv.DictReader(open(held / "labels.csv", newline=""))}
    truth = {r["img_path"]: (int(r["label_i"]), int(r["label_j"]))
             for r in csv.DictReader(open(held / "mimic-cxr-2.0.0-attn-label.csv", newline=""))}
    films = torch.stack([read_film(held / r["img_path"], data, cfg.sr_img_size) for r in reports])
    pairs = [enc.tokenize(r["report"]) for r in reports]
    ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
    att = torch.from_numpy(np.stack([p[1] for p in pairs]))
    sides = np.array([next(labels[r["img_path"]][f"{f}_side"] for f in FINDINGS if labels[r["img_path"]][f"{f}_side"])
                      for r in reports])
    true = np.array([truth[r["img_path"]] for r in reports])
    _, counts = np.unique(true, axis=0, return_counts=True)
    result = {"films": len(reports), "side_reading": side_reading(model, enc, films, ids, att, sides, tok),
              "best_constant_exact": float(counts.max() / len(true)), "methods": {}}
    for method in methods:
        best = []
        for s in range(0, len(reports), 50):
            found = score_windows(model, enc, films[s:s + 50], ids[s:s + 50], att[s:s + 50], method=method)
            best += [to_authors(o, cfg.grid, cfg.sr_window) for o in found.best()]
        best = np.array(best)
        # label_j 0 is the image's left (the patient's right), 2 its right; 1 is on neither side
        on_side = np.where(sides == "left", best[:, 1] > 1, best[:, 1] < 1)
        result["methods"][method] = {"side": float(on_side.mean()), "exact": float((best == true).all(1).mean())}
    return result


def cmd_compare(args: argparse.Namespace) -> None:
    from ecamp.train.pretrain.sr_windows import METHODS

    with tempfile.TemporaryDirectory(prefix="sr-held-") as tmp:
        held = write_data(Path(tmp) / "held", args.n, HELD_SEED)
        results = {kind: evaluate(Path(args.stage1) / kind, held, METHODS, args.n) for kind in ("image", "shuffled")}
    print(json.dumps(results, indent=2) if args.json else "")
    for kind, r in results.items():
        reading = ", ".join(f"{k} {v:.2f}" for k, v in r["side_reading"].items())
        print(f"\n{kind} first stage, {r['films']} held-out films; side-word AUROC with {reading}")
        print("| method | side agreement | exact window | best constant window |\n|---|---|---|---|")
        for m, v in r["methods"].items():
            print(f"| {m} | {v['side']:.3f} | {v['exact']:.3f} | {r['best_constant_exact']:.3f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train and export the two first stages")
    p.add_argument("--out", default="tests/data/sr-stage1")
    p.add_argument("--n", type=int, default=3000, help="training films")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--kinds", default="image,shuffled", help="which first stages to train")
    p.add_argument("--save-every", type=int, default=None, help="also keep the checkpoints every N steps")
    p.add_argument("--keep", default=None, help="keep the run folders here (default: a temporary folder)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("compare", help="the method comparison on held-out phantoms")
    p.add_argument("--stage1", default="tests/data/sr-stage1")
    p.add_argument("--n", type=int, default=400, help="held-out films")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
