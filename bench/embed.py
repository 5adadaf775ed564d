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

CPU runtimes, side by side in one run (``--cpu-runtimes``; needs the onnx and openvino extras and scikit-learn):

    python bench/embed.py --cpu-runtimes [--probe-films 96] [--repeats 5] [--no-compile]

Rows: torch eager float32 (the baseline), torch under bfloat16 autocast (where the CPU has bf16), ``torch.compile``,
ONNX Runtime and OpenVINO in float32 (``ecamp.runtime.runtime_model``, what ``--runtime`` runs), OpenVINO in
bfloat16, and dynamic int8 quantisation of the linear layers (ONNX Runtime's ``quantize_dynamic`` on the same graph,
and torch's). Images/s: the model alone on a batch of the preprocessed real films, every row timed once per repeat
in turn (so machine noise hits all alike); the median over repeats, with the lowest and highest. Fidelity, against
the fp32 eager embeddings: the cosine on RG1 and on the demo's phantom films (lowest and mean), and the linear-probe
AUROC of the demo task (``ecamp demo``'s phantom findings, first half of the films to train, second half to test;
mean over the four findings) minus eager's. The target: >= 2x eager images/s at cosine >= 0.999 and AUROC within
0.005.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import shutil
import tempfile
import time
import warnings
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


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _cpu_rows(model: torch.nn.Module, compile_: bool, tmp: Path) -> dict:
    """{row name: (forward on a float32 batch -> float32 embeddings, what it is)}."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from ecamp.runtime import runtime_model

    def torch_forward(m, dtype=None):
        def forward(x):
            with torch.inference_mode(), torch.autocast("cpu", dtype or torch.float32, enabled=dtype is not None):
                return m(x).float()
        return forward

    rows = {"torch eager fp32": (torch_forward(model), "baseline")}
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        rows["torch bf16 autocast"] = (torch_forward(model, torch.bfloat16), "torch.autocast('cpu', bfloat16)")
    if compile_:
        rows["torch.compile fp32"] = (torch_forward(torch.compile(model)), "inductor; compiled on first call")
    ort_model = runtime_model(model, "onnxruntime", cache_dir=tmp / "cache")
    rows["onnxruntime fp32"] = (ort_model, "--runtime onnxruntime")
    rows["openvino fp32"] = (runtime_model(model, "openvino", cache_dir=tmp / "cache"), "--runtime openvino")
    rows["openvino bf16"] = (runtime_model(model, "openvino", dtype=torch.bfloat16, cache_dir=tmp / "cache"),
                             "--runtime openvino --dtype bfloat16")
    quantised = tmp / "int8.onnx"
    quantize_dynamic(str(ort_model.folder / "model.onnx"), str(quantised), weight_type=QuantType.QInt8)
    session = ort.InferenceSession(str(quantised), providers=["CPUExecutionProvider"])
    rows["onnxruntime int8 dynamic"] = (lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0]),
                                        "onnxruntime.quantization.quantize_dynamic (QInt8 weights)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's deprecation notice
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
    rows["torch int8 dynamic"] = (torch_forward(q), "torch.ao.quantization.quantize_dynamic (nn.Linear)")
    return rows


def _run_cpu_runtimes(args: argparse.Namespace) -> None:
    import ecamp
    from ecamp.train.demo import _labels
    from ecamp.train.downstream.probe import fit_linear_probe
    from ecamp.train.phantom import write_phantom

    model = (ecamp.load(args.model) if args.model else _random_cxr_encoder()).float().eval()
    tmp = Path(tempfile.mkdtemp(prefix="ecamp-bench-runtimes-"))
    try:
        films, labels = _labels(write_phantom(tmp / "demo", args.probe_films, seed=1))
        from pydicom.data import get_testdata_file

        rg1 = get_testdata_file("RG1_UNCR.dcm")
        tf = ecamp.get_transform(model)
        x_demo, x_rg1 = tf(films), tf([rg1])
        t0 = time.perf_counter()
        rows = _cpu_rows(model, not args.no_compile, tmp)
        setup = time.perf_counter() - t0
        batch = torch.cat([x_rg1, x_demo[:args.batch_size - 1]])
        speeds: dict[str, list[float]] = {name: [] for name in rows}
        for forward, _ in rows.values():
            forward(batch)  # warm-up (and torch.compile's compilation)
        for _ in range(args.repeats):
            for name, (forward, _) in rows.items():
                t0 = time.perf_counter()
                forward(batch)
                speeds[name].append(len(batch) / (time.perf_counter() - t0))

        def embed_all(forward) -> np.ndarray:
            x = torch.cat([x_rg1, x_demo])
            return torch.cat([forward(x[i:i + args.batch_size]) for i in range(0, len(x), args.batch_size)]).numpy()

        emb = {name: embed_all(forward) for name, (forward, _) in rows.items()}
        half = len(films) // 2

        def auroc(z: np.ndarray) -> float:
            z = z[1:]  # the demo films
            return float(np.mean([fit_linear_probe(z[:half], y[:half], z[half:], y[half:]).auroc
                                  for y in labels.values()]))

        ref = emb["torch eager fp32"]
        ref_auroc, base = auroc(ref), float(np.median(speeds["torch eager fp32"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"CPU runtimes: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M-parameter "
          f"{args.model or 'ViT-B/16 (random weights)'}, batch {len(batch)} (RG1 + demo films), torch threads "
          f"{torch.get_num_threads()}, {args.repeats} repeats; setup (exports, quantisation) {setup:.0f} s; demo probe "
          f"{half} train / {len(films) - half} test films, eager mean AUROC {ref_auroc:.4f}")
    print("| runtime | img/s median (min-max) | x eager | cosine RG1 | cosine demo min (mean) | AUROC - eager | "
          "meets target | how |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (_, how) in rows.items():
        med, cos = float(np.median(speeds[name])), _cosines(emb[name], ref)
        d_auroc = auroc(emb[name]) - ref_auroc
        ok = med >= 2 * base and cos.min() >= 0.999 and abs(d_auroc) <= 0.005
        print(f"| {name} | {med:.2f} ({min(speeds[name]):.2f}-{max(speeds[name]):.2f}) | {med / base:.2f} | "
              f"{cos[0]:.6f} | {cos[1:].min():.6f} ({cos[1:].mean():.6f}) | {d_auroc:+.4f} | "
              f"{'yes' if ok else 'no'} | {how} |")


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
    parser.add_argument("--cpu-runtimes", action="store_true", help="the CPU runtime table instead (see above)")
    parser.add_argument("--probe-films", type=int, default=96, help="demo films for the cosines and the probe")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per CPU runtime row")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = parser.parse_args()
    if args.cpu_runtimes:
        _run_cpu_runtimes(args)
        return

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
