"""Embedding throughput: the model alone against files to embeddings end to end, for the same model in one run.

    python bench/embed.py                                   # CPU, a random full-size ViT-B/16, 8 films
    python bench/embed.py --device cuda --dtype bfloat16 --num-workers 8 --images 512 --preprocess-on gpu

- model only: pre-made ``[B, 3, H, W]`` tensors already on the device, ``model(x)`` per batch (what the embedding
  loop's forward costs when preprocessing is free);
- end to end: the files through ``ecamp.embed`` (DataLoader workers decoding, the preprocessing the weights
  expect on the CPU or, with ``--preprocess-on gpu``, on the device, the model, the copy back): images per second
  of wall time, the first batch's start-up (worker processes, cuDNN/cuBLAS warm-up) included once.

The ratio end-to-end / model-only says how much of the model's speed reaches the files (1.0: preprocessing is
fully hidden). ``--model`` defaults to a randomly initialised encoder built as ``ecamp.convert.encoder_for``
builds the CXR encoder (``cxr-vit-b``'s preprocessing cfg), so it runs offline; any ``ecamp.load`` name works
too. ``--files`` defaults to copies of the real radiograph RG1_UNCR (1955x1841, 15-bit DICOM, from pydicom-data)
and of the same film as an 8-bit PNG, written to a temporary folder.
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _random_cxr_encoder() -> torch.nn.Module:
    """The full-size encoder ``encoder_for`` exports for cxr-vit-b, with random weights."""
    from ecamp.convert import encoder_cfgs
    from ecamp.models.encoder import build_encoder
    from ecamp.models.pretrain import ECAMPPretrainConfig, encoder_config
    from ecamp.registry import load_manifest

    cfg = ECAMPPretrainConfig()
    pcfg, block = encoder_cfgs(load_manifest().resolve("cxr-vit-b"), cfg.img_size, cfg.in_chans)
    model = build_encoder(encoder_config(cfg, pcfg))
    model.ecamp_cfg = block
    return model.eval()


def _default_files(n: int, root: Path) -> list[str]:
    from PIL import Image
    from pydicom.data import get_testdata_file

    from ecamp.io import read_image

    dcm = Path(get_testdata_file("RG1_UNCR.dcm"))
    png = root / "rg1.png"
    Image.fromarray((read_image(dcm, policy="minmax") * 255).round().astype(np.uint8)).save(png)
    files = []
    for i, src in zip(range(n), itertools.cycle([dcm, png]), strict=False):
        dst = root / f"film_{i:05d}{src.suffix}"
        shutil.copyfile(src, dst)
        files.append(str(dst))
    return files


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="an ecamp.load name (default: a random full-size ViT-B/16)")
    parser.add_argument("--files", nargs="+", default=None, help="image files (default: copies of RG1 DICOM + PNG)")
    parser.add_argument("--images", type=int, default=8, help="how many default files to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--preprocess-on", choices=("cpu", "gpu", "auto"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--model-batches", type=int, default=3, help="timed batches of the model-only measurement")
    args = parser.parse_args()

    import ecamp

    device = torch.device(args.device)
    dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    model = (ecamp.load(args.model) if args.model else _random_cxr_encoder()).to(device).eval()
    tmp = Path(tempfile.mkdtemp(prefix="ecamp-bench-embed-"))
    try:
        files = args.files or _default_files(args.images, tmp)
        tf = ecamp.get_transform(model)
        _, h, w = (int(v) for v in tf.cfg["input_size"])

        x = torch.randn(args.batch_size, 3, h, w, device=device)
        with torch.inference_mode(), ecamp.embedding.autocast(device, dtype):
            model(x)  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(args.model_batches):
                model(x).float().cpu()
            model_ips = args.model_batches * args.batch_size / (time.perf_counter() - t0)

        t0 = time.perf_counter()
        emb = ecamp.embed(model, files, batch_size=args.batch_size, num_workers=args.num_workers, device=device,
                          dtype=dtype, progress=False, preprocess_on=args.preprocess_on)
        e2e_ips = len(files) / (time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    where = "gpu" if ecamp.embedding._on_device(args.preprocess_on, tf, device) else "cpu"
    print(f"device {device}, dtype {args.dtype}, batch {args.batch_size}, {args.num_workers} workers, "
          f"preprocessing on {where}, {len(files)} files, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
          f"params, output {tuple(emb.shape)} ({int(np.isnan(emb).any(1).sum())} unreadable)")
    print(f"{'model only img/s':>18} {'end to end img/s':>18} {'ratio':>7}")
    print(f"{model_ips:>18.2f} {e2e_ips:>18.2f} {e2e_ips / model_ips:>7.2f}")


if __name__ == "__main__":
    main()
