"""``ecamp demo``: the whole loop on the CPU, offline, in a few minutes.

Phantom data -> tiny ECAMP pre-training -> export -> ``ecamp.load("local-dir:...")`` -> linear probes of the four
phantom findings, next to the same probes on a randomly initialised encoder of the same architecture. Beside the
table the output folder gets ``report.md``: the probes' ROC curves (the same test scores as the table), the
pre-training losses read from the run's ``metrics.jsonl``, and where the encoders look on a few phantom films
(:mod:`ecamp.explain`: attention rollout of the encoder, Grad-CAM of each finding's probe), with the finding's box
from the phantom's ``findings.csv``. The plots need the ``plot`` extra; without it the report says so.

``ablation=True`` (``ecamp demo --ablation``) adds a third encoder: the same pre-training (config, seed, data and
steps) with ``model.mlm_weight=0``, i.e. MIM + super-resolution only, so the table shows what the reports add.
In :class:`~ecamp.models.ECAMPPretrainModel` information flows one way, from the image tokens into the text side
(the context-fusion layer reads them), and neither image loss reads the text; with the MLM term weighted 0 its
gradient is exactly zero, so the encoder trains on MIM + SR alone. The text side still runs, so every random draw
(masks, crops, dropout) is the one of the full run, and the two runs differ only in the reports' gradient.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from ecamp.models.pretrain import ECAMPPretrainConfig
from ecamp.train.pretrain.config import DataConfig, OptimConfig, PretrainRunConfig, RunConfig

__all__ = ["demo_config", "probe_classifier", "run_demo", "write_report"]

RANDOM, ABLATION, PRETRAINED = "random init", "MIM+SR only", "pre-trained"
_LOSSES = (("loss", "total"), ("mim_loss", "MIM"), ("sr_loss", "super-resolution"), ("mlm_loss", "weighted MLM"))
_PLOT_NOTE = 'The plots need matplotlib and grad-cam: `pip install "ecamp[plot]"`, then run the demo again.'


def demo_config() -> PretrainRunConfig:
    """The phantom preset (also shipped as preset ``phantom_tiny``): a small model on 256-px phantoms."""
    return PretrainRunConfig(
        model=ECAMPPretrainConfig(img_size=64, patch_size=8, embed_dim=96, depth=4, num_heads=3,
                                  decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=2, sr_window=6,
                                  vocab_size=512, text_hidden_size=64, text_layers=2, text_heads=2,
                                  text_intermediate_size=128, max_text_len=64),
        data=DataConfig(crop_scale=(0.5, 1.0)),
        optim=OptimConfig(lr=1.5e-3, batch_size=32, accum_iter=1, epochs=20, warmup_epochs=2, schedule_epochs=20),
        run=RunConfig(seed=0, num_workers=0, precision="fp32", save_every=10_000, keep_last=1),
    )


def _labels(folder: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    from ecamp.train.common.lists import read_table
    from ecamp.train.phantom import FINDINGS

    rows = read_table(folder / "labels.csv", ["img_path", *FINDINGS])
    return [str(folder / r["img_path"]) for r in rows], {k: np.array([int(r[k]) for r in rows]) for k in FINDINGS}


def _probe(model, files, labels, progress: bool) -> dict[str, Any]:
    """One linear probe per finding (:class:`~ecamp.train.downstream.probe.ProbeFit`), first half of the films
    to train, second half to test."""
    import ecamp
    from ecamp.train.downstream.probe import fit_linear_probe

    emb = ecamp.embed(model, files, batch_size=64, progress=progress)
    half = len(files) // 2
    return {k: fit_linear_probe(emb[:half], y[:half], emb[half:], y[half:]) for k, y in labels.items()}


def probe_classifier(encoder, probes: dict[str, Any]):
    """The encoder with a linear head whose class ``k`` is probe ``k`` (scaler and logistic regression folded into
    one layer): its logits are the probes' decision functions, so Grad-CAM can explain each probe."""
    import torch

    model = copy.deepcopy(encoder)
    model.reset_classifier(len(probes))
    weight, bias = [], []
    for fit in probes.values():
        scaler, lr = fit.classifier[0], fit.classifier[-1]
        w = lr.coef_[0] / scaler.scale_
        weight.append(w)
        bias.append(lr.intercept_[0] - float(w @ scaler.mean_))
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor(np.array(weight)))
        model.head.bias.copy_(torch.tensor(bias))
    model.pretrained_cfg = {**model.pretrained_cfg, "label_names": list(probes)}
    return model.eval()


def _pretrain(cfg: PretrainRunConfig, data: Path, out: Path, max_steps: int | None, progress: bool, echo,
              t0: float) -> dict[str, Any]:
    from ecamp.train.pretrain.export import export_checkpoint
    from ecamp.train.pretrain.loop import pretrain

    summary = pretrain(cfg, data, out / "run", max_steps=max_steps, progress=progress)
    echo(f"    {summary['step']} steps, {time.time() - t0:.0f} s so far")
    export_checkpoint(summary["checkpoint"], out / "export", "cxr-vit-b")
    return summary


def run_demo(out: str | Path, *, n_pretrain: int = 2000, n_probe: int = 600, max_steps: int | None = None,
             seed: int = 0, ablation: bool = False, config: PretrainRunConfig | None = None, progress: bool = True,
             echo=print) -> dict[str, Any]:
    """Run the demo in ``out``; returns the AUROCs per finding and their means per encoder, the steps run and the
    report's path. ``config`` replaces :func:`demo_config` (smaller runs for tests)."""
    import ecamp
    from ecamp.convert import encoder_for
    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.train.phantom import write_phantom

    out = Path(out)
    t0 = time.time()
    cfg = copy.deepcopy(config) if config is not None else demo_config()
    cfg.run.seed = seed
    n_steps = 6 if ablation else 5
    echo(f"1/{n_steps} phantom data: {n_pretrain} report-image pairs for pre-training, {n_probe} labelled for "
         f"probing")
    write_phantom(out / "pretrain-data", n_pretrain, seed=seed, progress=progress)
    write_phantom(out / "probe-data", n_probe, seed=seed + 1, progress=progress)
    echo(f"2/{n_steps} pre-training a small ECAMP model on the CPU (MIM + super-resolution + weighted MLM), and "
         f"exporting its encoder (timm format) and the full model")
    summary = _pretrain(cfg, out / "pretrain-data", out, max_steps, progress, echo, t0)
    runs = {PRETRAINED: out / "run"}
    echo(f"3/{n_steps} loading it back with ecamp.load('local-dir:...')")
    # the random encoder is drawn here, before any ablation run, so its column is the same with or without one
    encoders = {PRETRAINED: ecamp.load(f"local-dir:{out / 'export' / 'encoder'}"),
                RANDOM: encoder_for(ECAMPPretrainModel(cfg.model), "cxr-vit-b")}
    if ablation:
        echo(f"4/{n_steps} the same pre-training without the reports (model.mlm_weight=0: MIM + super-resolution)")
        no_text = copy.deepcopy(cfg)
        no_text.model.mlm_weight = 0.0
        _pretrain(no_text, out / "pretrain-data", out / "no-text", max_steps, progress, echo, t0)
        runs[ABLATION] = out / "no-text" / "run"
        encoders[ABLATION] = ecamp.load(f"local-dir:{out / 'no-text' / 'export' / 'encoder'}")
    files, labels = _labels(out / "probe-data")
    half = len(files) // 2
    echo(f"{n_steps - 1}/{n_steps} linear probes (logistic regression on frozen embeddings; {half} train / "
         f"{len(files) - half} test images)")
    probes = {name: _probe(model, files, labels, progress) for name, model in encoders.items()}
    aurocs = {name: {k: fit.auroc for k, fit in fits.items()} for name, fits in probes.items()}
    means = {name: float(np.mean(list(a.values()))) for name, a in aurocs.items()}
    echo("")
    header = f"{'finding':<14}" + "".join(f" {name + ' AUROC':>18}" for name in aurocs)
    echo(header)
    for k in labels:
        echo(f"{k:<14}" + "".join(f" {aurocs[name][k]:>18.3f}" for name in aurocs))
    echo(f"{'mean':<14}" + "".join(f" {means[name]:>18.3f}" for name in aurocs))
    echo(f"{n_steps}/{n_steps} report: ROC curves, pre-training losses, explain maps")
    report = write_report(out, probes=probes, labels=labels, files=files, runs=runs, encoders=encoders,
                          steps=summary["step"], n_pretrain=n_pretrain, seed=seed)
    echo(f"\ntotal {time.time() - t0:.0f} s; outputs in {out}; report: {report}")
    result = {"pretrained": aurocs[PRETRAINED], "random": aurocs[RANDOM], "mean_pretrained": means[PRETRAINED],
              "mean_random": means[RANDOM], "steps": summary["step"], "report": str(report)}
    if ablation:
        result.update(ablation=aurocs[ABLATION], mean_ablation=means[ABLATION])
    return result


# -- report.md ------------------------------------------------------------------------------------------------------
def write_report(out: str | Path, *, probes: dict[str, dict[str, Any]], labels: dict[str, np.ndarray],
                 files: list[str], runs: dict[str, Path], encoders: dict[str, Any], steps: int, n_pretrain: int,
                 seed: int) -> Path:
    """``out/report.md`` with the table and, with matplotlib and grad-cam, ``roc.png``, ``losses.png`` and
    ``explain.png`` beside it. ``probes``: encoder name -> finding -> ProbeFit; ``runs``: pre-training run folders
    (their ``metrics.jsonl``); ``files``/``labels``: the probe films, first half for training."""
    from ecamp.errors import MissingDependencyError
    from ecamp.fileio import atomic_write

    out = Path(out)
    half = len(files) // 2
    names = list(probes)
    lines = ["# ecamp demo", "",
             f"Phantom chest films: {steps} pre-training steps on {n_pretrain} report-film pairs (seed {seed}), "
             f"then one linear probe per finding (logistic regression on the frozen embedding) trained on "
             f"{half} labelled films and tested on {len(files) - half}.", "",
             "## Linear probes (test AUROC)", "",
             "| finding | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for k in labels:
        lines.append(f"| {k} | " + " | ".join(f"{probes[n][k].auroc:.3f}" for n in names) + " |")
    lines.append("| **mean** | " + " | ".join(f"**{np.mean([f.auroc for f in probes[n].values()]):.3f}**"
                                             for n in names) + " |")
    lines.append("")
    if PRETRAINED in names and RANDOM in names:
        lines += [f"*{PRETRAINED}*: the encoder of the ECAMP pre-training (MIM + super-resolution + weighted MLM on "
                  f"the reports); *{RANDOM}*: the same architecture, untrained."
                  + (f" *{ABLATION}*: the same pre-training (config, seed, data, steps) with `model.mlm_weight=0`: "
                     f"the encoder never gets a gradient from the reports, so the difference to *{PRETRAINED}* is "
                     f"what the reports add." if ABLATION in names else ""), ""]
    sections = [("ROC curves", "roc.png", "ROC curves of the linear probes",
                 lambda p: _plot_roc(p, probes, labels, half)),
                ("Pre-training losses", "losses.png", "Pre-training losses against step",
                 lambda p: _plot_losses(p, runs)),
                ("Where the encoders look", "explain.png", "Explain maps of phantom films",
                 lambda p: _plot_explain(p, out, probes, labels, files, encoders))]
    missing = None
    for title, png, alt, plot in sections:
        lines += [f"## {title}", ""]
        if missing is None:
            try:
                caption = plot(out / png)
                lines += [f"![{alt}]({png})", "", caption, ""]
                continue
            except MissingDependencyError as e:
                missing = e
        lines += [_PLOT_NOTE, ""]
    report = out / "report.md"
    atomic_write(report, lambda p: p.write_text("\n".join(lines), encoding="utf-8"))
    return report


def _plot_roc(path: Path, probes: dict[str, dict[str, Any]], labels: dict[str, np.ndarray], half: int) -> str:
    from sklearn.metrics import roc_curve

    from ecamp.explain import new_figure, save_figure

    fig = new_figure(figsize=(3.2 * len(labels), 4.8))
    for ax, (k, y) in zip(fig.subplots(1, len(labels), squeeze=False)[0], labels.items(), strict=True):
        for name, fits in probes.items():
            fpr, tpr, _ = roc_curve(y[half:], fits[k].scores)
            ax.plot(fpr, tpr, label=f"{name} ({fits[k].auroc:.3f})", drawstyle="steps-post")
        ax.plot([0, 1], [0, 1], ls=":", c="grey", label="chance (0.5)")
        ax.set(title=k, xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
               aspect="equal")
        # below the axes: inside, the legend would hide the curves' upper left, where they differ
        ax.legend(title="encoder (AUROC)", fontsize="small", title_fontsize="small", loc="upper center",
                  bbox_to_anchor=(0.5, -0.2))
    save_figure(fig, path)
    return "One probe per finding and encoder, on the test films; the AUROCs are the table's."


def _plot_losses(path: Path, runs: dict[str, Path]) -> str:
    from matplotlib.ticker import MaxNLocator

    from ecamp.explain import new_figure, save_figure

    rows = {name: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
            for name, run in runs.items()}
    fig = new_figure(figsize=(3.2 * len(_LOSSES), 3.2))
    for ax, (key, what) in zip(fig.subplots(1, len(_LOSSES), squeeze=False)[0], _LOSSES, strict=True):
        for (name, log), style in zip(rows.items(), ("-", "--"), strict=False):
            ax.plot([r["step"] for r in log], [r[key] for r in log], ls=style, marker="." if len(log) < 20 else None,
                    label=name)
        ax.set(title=what, xlabel="optimizer step", ylabel=key)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.legend(fontsize="small")
    save_figure(fig, path)
    note = (f" In the *{ABLATION}* run the MLM loss is computed but weighted 0 (its total is MIM + SR): its curve "
            f"shows the untrained text side." if ABLATION in runs else "")
    return f"The losses of each pre-training run, per optimizer step, from its `metrics.jsonl`.{note}"


def _films_to_show(labels: dict[str, np.ndarray], half: int) -> list[tuple[int, str]]:
    """One test film per finding: the first that shows it alone, else the first that shows it."""
    stack = np.stack(list(labels.values()), 1)
    picks = []
    for j, k in enumerate(labels):
        test = np.arange(half, len(stack))
        alone = [i for i in test if stack[i, j] and stack[i].sum() == 1]
        any_ = [i for i in test if stack[i, j]]
        if alone or any_:
            picks.append(((alone or any_)[0], k))
    return picks


def _boxes(folder: Path) -> dict[tuple[str, str], tuple[float, float, float, float]]:
    """(image, finding) -> pixel box (x1, y1, x2, y2), exclusive ends, from the phantom's ``findings.csv``."""
    from ecamp.train.common.lists import read_table

    table = folder / "findings.csv"
    if not table.is_file():
        return {}
    return {(str(folder / r["img_path"]), r["finding"]): tuple(float(r[c]) for c in ("x1", "y1", "x2", "y2"))
            for r in read_table(table, ["img_path", "finding", "x1", "y1", "x2", "y2"])}


def _plot_explain(path: Path, out: Path, probes: dict[str, dict[str, Any]], labels: dict[str, np.ndarray],
                  files: list[str], encoders: dict[str, Any]) -> str:
    from matplotlib.patches import Rectangle

    from ecamp.explain import explain, new_figure, overlay, save_figure
    from ecamp.io import read_image

    picks = _films_to_show(labels, len(files) // 2)
    boxes = _boxes(out / "probe-data")
    rows = [(f"{PRETRAINED}\nattention rollout", encoders[PRETRAINED], "rollout", False)]
    rows += [(f"{name}\nGrad-CAM of its probe", probe_classifier(encoders[name], probes[name]), "gradcam", True)
             for name in probes]
    fig = new_figure(figsize=(2.6 * len(picks) + 1.2, 2.7 * len(rows)))
    axes = fig.subplots(len(rows), len(picks), squeeze=False)
    im = None
    for r, (row_name, model, method, targeted) in enumerate(rows):
        for c, (i, finding) in enumerate(picks):
            heat = explain(model, files[i], target=finding if targeted else None, method=method)
            ax = axes[r, c]
            im = overlay(read_image(files[i]), heat, ax=ax, colorbar=None)  # square films: nothing cropped
            box = boxes.get((files[i], finding))
            if box is not None:
                x1, y1, x2, y2 = box
                ax.add_patch(Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, ec="white", lw=1.2,
                                       ls="--"))
            ax.set(title=f"{finding}\n{Path(files[i]).name}" if r == 0 else None, xticks=[], yticks=[],
                   xlabel=None, ylabel=row_name if c == 0 else None)
    fig.colorbar(im, ax=axes, shrink=0.6, label="relevance (each map scaled to [0, 1])")
    save_figure(fig, path)
    box_note = " The dashed box is where the phantom drew the finding." if boxes else ""
    return (f"Test films with one finding each (column titles). First row: attention rollout of the pre-trained "
            f"encoder (not class-specific). Other rows: Grad-CAM of each encoder's probe for the column's finding: "
            f"the probe's scaler and logistic regression folded into a linear head (`probe_classifier`); an empty "
            f"map means that no part of the film raises the probe's score.{box_note} Any map: "
            f"`ecamp explain --model local-dir:{out / 'export' / 'encoder'} FILM --out map.png`.")
