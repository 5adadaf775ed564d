"""Pre-training step cost: seconds per optimizer step and peak memory, next to data-loading throughput.

    python bench/pretrain_step.py                # tiny (the demo preset) and full ViT-B/16, on the CPU
    python bench/pretrain_step.py --device cuda --precision bf16 --batch-size 64 --sizes full

Each model size runs in its own process (so peak memory is that size's alone). Data throughput is measured on
phantom films with the same augmentation and report encoding, so the two numbers side by side tell whether a step
is bound by the model or by the data pipeline (images/s of data must exceed images/s of the model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def _measure(size: str, device: str, precision: str, batch: int, steps: int) -> dict:
    import resource

    import torch

    from ecamp.models.pretrain import ECAMPPretrainConfig, ECAMPPretrainModel
    from ecamp.train.demo import demo_config

    cfg = demo_config().model if size == "tiny" else ECAMPPretrainConfig()
    dev = torch.device(device)
    model = ECAMPPretrainModel(cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
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
    from ecamp.train.pretrain.data import PretrainDataset
    from ecamp.train.demo import demo_config
    from ecamp.train.phantom import write_phantom

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["tiny", "full"], choices=["tiny", "full"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=None, help="default: 32 tiny, 2 full on the CPU")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
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
