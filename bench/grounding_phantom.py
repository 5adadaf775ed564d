"""Grounding and finding scores of a pre-training model on held-out phantom films (the tables of docs/predicting.md).

    python bench/grounding_phantom.py side --model tests/data/sr-stage1/image          # ~5 min on 2 CPU cores
    ecamp demo --out DEMO --max-steps 450 --n-probe 200                                 # ~20 min on 2 CPU cores
    python bench/grounding_phantom.py scores --demo DEMO                                # ~3 min

``side``: phantom films with one lateralised finding each (effusion or pneumothorax, left or right; seed 1, which
the first stage never saw) and their one-sentence reports. For each method of :func:`ecamp.explain.ground` (and
occlusion regions), the share of films whose map peaks on the finding's side of the image (the patient's left is
the image's right), with the film's own report and with the next film's report (then the share that peaks on the
film's own side, and on the side the borrowed report names).

``scores``: films the demo never saw (seed 2), four findings; per finding the AUROC of
:func:`ecamp.explain.score_findings` (no labels) for each baseline, beside a linear probe of the demo's exported
encoder (first half of the films to fit, second half to test: every AUROC is on the second half) and the same
scores from a randomly initialised model of the same architecture and tokenizer.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

import numpy as np

PHRASES = {"effusion": "pleural effusion", "nodule": "nodule", "cardiomegaly": "cardiomegaly",
           "pneumothorax": "pneumothorax"}


def _rows(root: Path, name: str) -> list[dict[str, str]]:
    with open(root / name, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def side(args) -> None:
    import ecamp
    from ecamp.explain import ground
    from ecamp.train.phantom import write_phantom

    model = ecamp.load_pretrain(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantom(Path(tmp), args.n, seed=1, size=128, p_finding=0.0, one_of=("effusion", "pneumothorax"),
                             report="short")
        reports = {r["img_path"]: r["report"] for r in _rows(root, "mimic-cxr-2.0.0-entity-llm.csv")}
        labels = _rows(root, "labels.csv")
        films = [r["img_path"] for r in labels]
        sides = {r["img_path"]: r["effusion_side"] or r["pneumothorax_side"] for r in labels}
        g = model.config.grid
        runs = [("occlusion", r) for r in args.regions] + [("gradient", None), ("authors", None)]
        print("| method | peak on the finding's side | another film's report: the film's side | "
              "the borrowed report's side |")
        print("|---|---|---|---|")
        for method, region in runs:
            own, other, follows = [], [], []
            for i, path in enumerate(films):
                borrowed = films[(i + 1) % len(films)]
                for text, out in ((reports[path], own), (reports[borrowed], other)):
                    kw = {"region": region} if method == "occlusion" else {}
                    if method == "authors":  # their map of one token: the side word
                        kw["word"] = "left" if " left " in f" {text.lower()} " else "right"
                    heat = ground(model, root / path, text, method=method, **kw)
                    peak_x = np.unravel_index(int(heat.argmax()), heat.shape)[1]
                    right_of_image = peak_x >= heat.shape[1] / 2
                    out.append(right_of_image == (sides[path] == "left"))
                    if out is other:
                        follows.append(right_of_image == (sides[borrowed] == "left"))
            name = f"occlusion, region {region} of {g}" if method == "occlusion" else method
            print(f"| {name} | {np.mean(own):.3f} | {np.mean(other):.3f} | {np.mean(follows):.3f} |", flush=True)
        print(f"\n{len(films)} films; `python bench/grounding_phantom.py side --model {args.model} --n {args.n}`")


def scores(args) -> None:
    import torch
    from sklearn.metrics import roc_auc_score

    import ecamp
    from ecamp.explain import score_findings
    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.train.downstream.probe import fit_linear_probe
    from ecamp.train.phantom import FINDINGS, write_phantom

    demo = Path(args.demo)
    pre = ecamp.load_pretrain(f"local-dir:{demo / 'export' / 'pretrain'}")
    torch.manual_seed(0)
    rand = ECAMPPretrainModel(pre.config).eval()
    rand.ecamp_cfg, rand.tokenizer_path = pre.ecamp_cfg, pre.tokenizer_path
    encoder = ecamp.load(f"local-dir:{demo / 'export' / 'encoder'}")
    with tempfile.TemporaryDirectory() as tmp:
        root = write_phantom(Path(tmp), args.n, seed=2)
        labels = _rows(root, "labels.csv")
        files = [str(root / r["img_path"]) for r in labels]
        y = {f: np.array([int(r[f]) for r in labels]) for f in FINDINGS}
        half = len(files) // 2
        phrases = [PHRASES[f] for f in FINDINGS]
        table = {}
        for name, model in (("pre-trained", pre), ("random init", rand)):
            for baseline in ("negated", "blank"):
                s = score_findings(model, files[half:], phrases, baseline=baseline)
                table[(name, baseline)] = {f: roc_auc_score(y[f][half:], s[:, k]) for k, f in enumerate(FINDINGS)}
        emb = ecamp.embed(encoder, files, progress=False)
        probe = {f: fit_linear_probe(emb[:half], y[f][:half], emb[half:], y[f][half:]).auroc for f in FINDINGS}
    cols = [("pre-trained", "negated"), ("pre-trained", "blank"), ("random init", "negated"),
            ("random init", "blank")]
    print("| finding (phrase) | positives | " + " | ".join(f"{m}, {b}" for m, b in cols) + " | linear probe |")
    print("|---" * (len(cols) + 3) + "|")
    for f in FINDINGS:
        vals = " | ".join(f"{table[c][f]:.3f}" for c in cols)
        print(f"| {f} (\"{PHRASES[f]}\") | {int(y[f][half:].sum())}/{len(files) - half} | {vals} | "
              f"{probe[f]:.3f} |")
    print(f"\n`python bench/grounding_phantom.py scores --demo {args.demo} --n {args.n}`")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("side", help="where the maps peak")
    s.add_argument("--model", default="tests/data/sr-stage1/image")
    s.add_argument("--n", type=int, default=200)
    s.add_argument("--regions", type=int, nargs="+", default=[2, 3])
    s.set_defaults(func=side)
    s = sub.add_parser("scores", help="finding scores without labels")
    s.add_argument("--demo", required=True, help="the --out folder of `ecamp demo`")
    s.add_argument("--n", type=int, default=400)
    s.set_defaults(func=scores)
    args = p.parse_args()
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
