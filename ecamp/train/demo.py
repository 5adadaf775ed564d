"""``ecamp demo``: the whole loop on the CPU, offline, in a few minutes.

Phantom data -> tiny ECAMP pre-training -> export -> ``ecamp.load("local-dir:...")`` -> linear probes of the four
phantom findings, next to the same probes on a randomly initialised encoder of the same architecture.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ecamp.models.pretrain import ECAMPPretrainConfig
from ecamp.train.pretrain.config import DataConfig, OptimConfig, PretrainRunConfig, RunConfig

__all__ = ["demo_config", "run_demo"]


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


def _probe(model, files, labels, progress: bool) -> dict[str, float]:
    import ecamp
    from ecamp.train.downstream.probe import linear_probe_auroc

    emb = ecamp.embed(model, files, batch_size=64, progress=progress)
    half = len(files) // 2
    return {k: linear_probe_auroc(emb[:half], y[:half], emb[half:], y[half:]) for k, y in labels.items()}


def run_demo(out: str | Path, *, n_pretrain: int = 2000, n_probe: int = 600, max_steps: int | None = None,
             seed: int = 0, progress: bool = True, echo=print) -> dict[str, Any]:
    import ecamp
    from ecamp.convert import encoder_for
    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.train.phantom import write_phantom
    from ecamp.train.pretrain.export import export_checkpoint
    from ecamp.train.pretrain.loop import pretrain

    out = Path(out)
    t0 = time.time()
    cfg = demo_config()
    cfg.run.seed = seed
    echo(f"1/5 phantom data: {n_pretrain} report-image pairs for pre-training, {n_probe} labelled for probing")
    write_phantom(out / "pretrain-data", n_pretrain, seed=seed, progress=progress)
    write_phantom(out / "probe-data", n_probe, seed=seed + 1, progress=progress)
    echo("2/5 pre-training a small ECAMP model on the CPU (MIM + super-resolution + weighted MLM)")
    summary = pretrain(cfg, out / "pretrain-data", out / "run", max_steps=max_steps, progress=progress)
    echo(f"    {summary['step']} steps in {time.time() - t0:.0f} s")
    echo("3/5 exporting the encoder (timm format) and the full model")
    export_checkpoint(summary["checkpoint"], out / "export", "cxr-vit-b")
    echo("4/5 loading it back with ecamp.load('local-dir:...')")
    model = ecamp.load(f"local-dir:{out / 'export' / 'encoder'}")
    random_model = encoder_for(ECAMPPretrainModel(cfg.model), "cxr-vit-b")
    files, labels = _labels(out / "probe-data")
    echo(f"5/5 linear probes (logistic regression on frozen embeddings; {len(files) // 2} train / "
         f"{len(files) - len(files) // 2} test images)")
    ours = _probe(model, files, labels, progress)
    rand = _probe(random_model, files, labels, progress)
    echo("")
    echo(f"{'finding':<14} {'pre-trained AUROC':>18} {'random init AUROC':>18}")
    for k in labels:
        echo(f"{k:<14} {ours[k]:>18.3f} {rand[k]:>18.3f}")
    mo, mr = float(np.mean(list(ours.values()))), float(np.mean(list(rand.values())))
    echo(f"{'mean':<14} {mo:>18.3f} {mr:>18.3f}")
    echo(f"\ntotal {time.time() - t0:.0f} s; outputs in {out}")
    return {"pretrained": ours, "random": rand, "mean_pretrained": mo, "mean_random": mr, "steps": summary["step"]}
