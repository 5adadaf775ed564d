"""Pre-training step cost: seconds per optimizer step and peak memory, next to data-loading throughput.

    python bench/pretrain_step.py                # tiny (the demo preset) and full ViT-B/16, on the CPU
    python bench/pretrain_step.py --device cuda --precision bf16 --batch-size 64 --sizes full
    python bench/pretrain_step.py --vs-authors PATH/TO/ECAMP-checkout --device cuda --precision bf16 --batch-size 64

Each model size runs in its own process (so peak memory is that size's alone). Data throughput is measured on
phantom films with the same augmentation and report encoding, so the two numbers side by side tell whether a step
is bound by the model or by the data pipeline (images/s of data must exceed images/s of the model).

``--vs-authors`` times ecamp's step against the authors' model (``ECAMP/Pre-training/module/model_ecamp.py``
``ecamp()``), imported at run time from the checkout given; nothing of it is copied here. Each model lives in its
own process (its own peak memory) on the same device; the parent feeds both the same saved batch, precision and
mask ratio, seeds each step alike (so both draw the same MAE mask), and alternates their timed steps a1 b1 a2 b2.
Their code was written for transformers 4.42 (their environment.yml); under transformers 5 it fails to import
(``module/context_fusion.py:4``: ``apply_chunking_to_forward`` left ``transformers.modeling_utils``). Give a folder
holding transformers 4.42.4, tokenizers 0.19.1 and huggingface-hub 0.27.0 with ``--authors-pythonpath``
(``pip install --target DIR --no-deps transformers==4.42.4 tokenizers==0.19.1 huggingface-hub==0.27.0``); only the
authors' process sees it. To run their files unedited, that process also provides an empty ``ipdb`` module when it
is not installed, the ``np.float`` alias NumPy 2 removed (``util/pos_embed.py:56``), skips transformers 4.42's
import-time pin check (``numpy<2``), and on the CPU makes ``Tensor.cuda`` return the tensor itself during their
forward only. Their sizes are fixed in ``ecamp()`` (and ``forward`` resizes to 224, ``mask_2_pixel`` takes a
12-cell window), so the comparison runs at the full size only.

MFU is model FLOPs per step (``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward of each
model: matrix multiplies, convolutions and attention) / step time / the device's peak (``--peak-tflops``; default
989 TFLOPS dense bf16/fp16 on H100/H200, n/a elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# dense bf16/fp16 tensor-core peaks (TFLOPS) by device name, for MFU
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4}


def _measure(size: str, device: str, precision: str, batch: int, steps: int) -> dict:
    import resource

    import torch

    from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
    from ecamp.train.demo import demo_config
    from ecamp.train.pretrain.config import PretrainRunConfig
    from ecamp.train.pretrain.loop import make_optimizer

    cfg = demo_config().model if size == "tiny" else ECAMPPretrainConfig()
    dev = torch.device(device)
    model = ECAMPPretrainModel(cfg).to(dev).train()
    opt = make_optimizer(model, PretrainRunConfig(model=cfg))
    length = cfg.max_text_len
    batch_t = {"image": torch.randn(batch, 3, cfg.sr_img_size, cfg.sr_img_size),
               "input_ids": torch.randint(5, cfg.vocab_size, (batch, length)),
               "labels": torch.randint(5, cfg.vocab_size, (batch, length)),
               "attention_mask": torch.ones(batch, length, dtype=torch.long),
               "token_type_ids": torch.zeros(batch, length, dtype=torch.long), "weights": torch.ones(batch, length),
               "sr_window": torch.zeros(batch, 2, dtype=torch.long)}
    batch_t = {k: v.to(dev) for k, v in batch_t.items()}
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def step():
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = model(batch_t)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"size": size, "s_per_step": dt, "images_per_s": batch / dt, "peak_gib": mem, "batch": batch,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def _data_rate(size: str, n: int = 64) -> float:
    from ecamp.text import ReportEncoder, train_tokenizer
    from ecamp.train.demo import demo_config
    from ecamp.train.phantom import write_phantom
    from ecamp.train.pretrain.data import PretrainDataset

    cfg = demo_config()
    if size == "full":
        from ecamp.models.pretrain import ECAMPPretrainConfig

        cfg.model = ECAMPPretrainConfig()
    root = write_phantom(tempfile.mkdtemp(), n, seed=0, size=512 if size == "full" else 256)
    rows = (root / "mimic-cxr-2.0.0-entity-llm.csv").read_text().splitlines()[1:]
    enc = ReportEncoder(train_tokenizer(rows, vocab_size=512, min_frequency=1), max_length=cfg.model.max_text_len)
    ds = PretrainDataset(root, cfg, enc)
    ds[0]
    t0 = time.perf_counter()
    for i in range(n):
        ds[i]
    return n / (time.perf_counter() - t0)


# -- ecamp vs the authors' model ---------------------------------------------------------------------------------
def _make_batch(path: Path, batch: int, seed: int) -> None:
    """One full-size batch in ecamp's names; the authors' worker renames it (see ``_authors_inputs``)."""
    import torch

    from ecamp.models.pretrain import ECAMPPretrainConfig

    cfg = ECAMPPretrainConfig()
    g = torch.Generator().manual_seed(seed)
    length = cfg.max_text_len
    # labels on every position, as the authors' data gives them; SR window offsets in 0..grid - window
    torch.save({"image": torch.randn(batch, 3, cfg.sr_img_size, cfg.sr_img_size, generator=g),
                "input_ids": torch.randint(5, cfg.vocab_size, (batch, length), generator=g),
                "labels": torch.randint(5, cfg.vocab_size, (batch, length), generator=g),
                "attention_mask": torch.ones(batch, length, dtype=torch.long),
                "token_type_ids": torch.zeros(batch, length, dtype=torch.long),
                "weights": torch.rand(batch, length, generator=g) + 0.5,
                "sr_window": torch.randint(0, cfg.grid - cfg.sr_window + 1, (batch, 2), generator=g)}, path)


def _authors_inputs(b: dict) -> dict:
    """ecamp's batch in the names of the authors' ``ECAMP.forward``: their ``column`` indexes the first (row) axis
    of the cell grid in ``mask_2_pixel``, ecamp's ``sr_window[:, 0]``; ``row`` the second."""
    return {"image": b["image"], "ids": b["input_ids"], "labels": b["labels"], "attention_mask": b["attention_mask"],
            "type_ids": b["token_type_ids"], "weights": b["weights"], "column": b["sr_window"][:, 0],
            "row": b["sr_window"][:, 1]}


def _import_authors(checkout: Path):
    """The authors' ``ecamp`` factory from ``checkout``, importable without editing their files."""
    import types
    import warnings

    import numpy as np

    root = checkout / "ECAMP" / "Pre-training"
    if not (root / "module" / "model_ecamp.py").is_file():
        from ecamp.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{checkout} is not a checkout of ToniChopp/ECAMP (no ECAMP/Pre-training/module/"
                                   f"model_ecamp.py); pass the folder that holds ECAMP/.", path=checkout)
    sys.path.insert(0, str(root))  # their `from util.pos_embed import ...` is relative to Pre-training/
    try:
        import ipdb  # noqa: F401
    except ImportError:
        sys.modules["ipdb"] = types.ModuleType("ipdb")  # imported at module level, used only in comments
    if not hasattr(np, "float"):
        np.float = float  # the alias their util/pos_embed.py uses; NumPy 1.24 removed it
    pin_check = types.ModuleType("transformers.dependency_versions_check")
    pin_check.dep_version_check = lambda *a, **k: None
    sys.modules.setdefault("transformers.dependency_versions_check", pin_check)
    warnings.filterwarnings("ignore", category=FutureWarning)
    from module.model_ecamp import ecamp

    return ecamp


def _worker(kind: str, args) -> None:
    """One model's process: build, count FLOPs, warm up, then one timed step per ``step`` line on stdin."""
    import contextlib
    import resource
    import traceback

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ecamp.train.common.precision import autocast, grad_scaler

    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # their `.cuda()` calls go to the current device
    batch = {k: v.to(dev) for k, v in torch.load(args.batch_file, weights_only=True).items()}
    scaler = grad_scaler(dev, args.precision)
    try:
        if kind == "ecamp":
            from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
            from ecamp.train.pretrain.config import PretrainRunConfig
            from ecamp.train.pretrain.loop import make_optimizer

            model = ECAMPPretrainModel(ECAMPPretrainConfig()).to(dev).train()
            opt = make_optimizer(model, PretrainRunConfig())
            call = torch.compile(model) if args.compile else model
            inputs, patch = batch, contextlib.nullcontext

            def loss_of():
                return call(inputs, mask_ratio=args.mask_ratio)["loss"]
        else:
            from timm.optim import param_groups_weight_decay

            factory = _import_authors(Path(args.vs_authors))
            model = factory().to(dev).train()
            # their main_pretrain.py: AdamW over add_weight_decay groups, betas (0.9, 0.95)
            opt = torch.optim.AdamW(param_groups_weight_decay(model, 0.05), lr=1e-4, betas=(0.9, 0.95))
            inputs = _authors_inputs(batch)

            @contextlib.contextmanager
            def patch():  # their forward calls .cuda() on its inputs; on the CPU that is the tensor itself
                if dev.type == "cuda":
                    yield
                    return
                original = torch.Tensor.cuda
                torch.Tensor.cuda = lambda self, *a, **k: self
                try:
                    yield
                finally:
                    torch.Tensor.cuda = original

            def loss_of():
                mim, res, mlm = model(inputs, mask_ratio=args.mask_ratio)
                return mim + res + mlm  # their engine's sum
    except Exception as e:  # noqa: BLE001 - reported to the parent, which still prints ecamp's figures
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{f.filename}:{f.lineno}" for f in reversed(tb) if args.vs_authors in f.filename),
                     f"{tb[-1].filename}:{tb[-1].lineno}")
        print("fail " + json.dumps({"where": where, "error": f"{type(e).__name__}: {e}"}), flush=True)
        return

    def step(i: int):
        torch.manual_seed(1000 + i)  # both models draw the same MAE mask (their first random draw) at step i
        with patch(), autocast(dev, args.precision):
            loss = loss_of()
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with FlopCounterMode(display=False) as counter:  # eager, before any compiled call
        step(-1)
    flops = counter.get_total_flops()
    for i in range(args.warmup):
        step(-2 - i)
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print("ready " + json.dumps({"flops": flops, "params_m": sum(p.numel() for p in model.parameters()) / 1e6}),
          flush=True)
    times = []
    for i, line in enumerate(sys.stdin):
        if line.strip() != "step":
            break
        sync()
        t0 = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - t0)
        print(f"t {times[-1]}", flush=True)
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("end " + json.dumps({"times": times, "peak_gib": peak}), flush=True)


def _peak_tflops(args) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if not args.device.startswith("cuda") or args.precision == "fp32":
        return None
    import torch

    name = torch.cuda.get_device_name(torch.device(args.device))
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _vs_authors(args) -> None:
    batch = args.batch_size or 2
    env = dict(os.environ)
    authors_env = dict(env)
    if args.authors_pythonpath:
        authors_env["PYTHONPATH"] = os.pathsep.join([args.authors_pythonpath, env.get("PYTHONPATH", "")]).rstrip(
            os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        batch_file = Path(tmp) / "batch.pt"
        _make_batch(batch_file, batch, seed=0)
        common = ["--device", args.device, "--precision", args.precision, "--batch-file", str(batch_file),
                  "--mask-ratio", str(args.mask_ratio), "--warmup", str(args.warmup), "--vs-authors",
                  str(args.vs_authors)] + (["--compile"] if args.compile else [])
        procs, info = {}, {}
        for kind, e in (("ecamp", env), ("authors", authors_env)):
            procs[kind] = subprocess.Popen([sys.executable, __file__, "--worker", kind, *common], env=e, text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for kind, p in procs.items():  # build and warm up at the same time; only the timed steps alternate
            for line in p.stdout:
                if line.startswith(("ready ", "fail ")):
                    info[kind] = (line.split(" ", 1)[0], json.loads(line.split(" ", 1)[1]))
                    break
            else:
                info[kind] = ("fail", {"where": "worker", "error": f"exited with {p.wait()} before its first step"})
        live = [k for k in ("ecamp", "authors") if info[k][0] == "ready"]
        for _ in range(args.steps):
            for kind in live:  # a1 b1 a2 b2 ...
                procs[kind].stdin.write("step\n")
                procs[kind].stdin.flush()
                procs[kind].stdout.readline()
        results = {}
        for kind in live:
            procs[kind].stdin.write("end\n")
            procs[kind].stdin.flush()
            for line in procs[kind].stdout:
                if line.startswith("end "):
                    results[kind] = {**info[kind][1], **json.loads(line[4:])}
                    break
        for p in procs.values():
            p.stdin.close()
            p.wait()
    peak = _peak_tflops(args)
    print(f"ecamp vs the authors' model: device {args.device}, {args.precision}, batch {batch}, mask ratio "
          f"{args.mask_ratio}, {args.steps} timed steps each, interleaved, after {args.warmup} warm-up"
          f"{' (ecamp compiled)' if args.compile else ''}; peak {peak or 'n/a'} TFLOPS")
    print(f"{'model':<8} {'params':>8} {'s/step':>8} {'img/s':>8} {'peak GiB':>9} {'GFLOP/step':>11} {'MFU':>6}")
    for kind in ("ecamp", "authors"):
        if kind not in results:
            print(f"{kind:<8} could not run: {info[kind][1]['error']} (at {info[kind][1]['where']})")
            continue
        r = results[kind]
        times = sorted(r["times"])
        dt = times[len(times) // 2]  # the median step: robust to a neighbour's burst on a shared machine
        mfu = f"{100 * r['flops'] / dt / (peak * 1e12):.1f}%" if peak else "n/a"
        r["s_per_step"] = dt
        print(f"{kind:<8} {r['params_m']:>7.1f}M {dt:>8.3f} {batch / dt:>8.2f} {r['peak_gib']:>9.2f} "
              f"{r['flops'] / 1e9:>11.1f} {mfu:>6}")
    if len(results) == 2:
        ratio = results["authors"]["s_per_step"] / results["ecamp"]["s_per_step"]
        print(f"ratio ecamp/authors (images/s): {ratio:.2f}x")
    elif "authors" not in results and not args.authors_pythonpath:
        print("The authors' code targets transformers 4.42: pass --authors-pythonpath DIR holding "
              "transformers==4.42.4 tokenizers==0.19.1 huggingface-hub==0.27.0 (pip install --target DIR --no-deps).")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 tiny, 2 full on the CPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--vs-authors", default=None, metavar="CHECKOUT",
                   help="time ecamp's step against the authors' model from this ToniChopp/ECAMP checkout")
    p.add_argument("--authors-pythonpath", default=None, metavar="DIR",
                   help="put DIR (holding transformers 4.42.4 etc.) first on the authors' process's path")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the FLOP count (more with --compile)")
    p.add_argument("--compile", action="store_true", help="torch.compile ecamp's model (as run.compile=true)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for MFU; default 989 (dense bf16/fp16) on H100/H200, else n/a")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker", default=None, choices=["ecamp", "authors"], help=argparse.SUPPRESS)
    p.add_argument("--batch-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        _worker(args.worker, args)
        return
    if args.vs_authors:
        _vs_authors(args)
        return
    if args.child:
        size, batch = args.child.split(":")
        print(json.dumps(_measure(size, args.device, args.precision, int(batch), args.steps)))
        return
    print(f"device {args.device}, {args.precision}, {args.steps} timed steps after one warm-up")
    print(f"{'size':<6} {'params':>8} {'batch':>6} {'s/step':>8} {'model img/s':>12} {'data img/s (1 proc)':>20} "
          f"{'peak GiB':>9}")
    for size in args.sizes:
        batch = args.batch_size or (32 if size == "tiny" else 2)
        out = subprocess.run([sys.executable, __file__, "--child", f"{size}:{batch}", "--device", args.device,
                              "--precision", args.precision, "--steps", str(args.steps)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        rate = _data_rate(size)
        print(f"{size:<6} {r['params_m']:>7.1f}M {batch:>6} {r['s_per_step']:>8.3f} {r['images_per_s']:>12.1f} "
              f"{rate:>20.1f} {r['peak_gib']:>9.2f}")


if __name__ == "__main__":
    main()
