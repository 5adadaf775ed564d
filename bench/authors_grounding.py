"""The authors' ``Visualization/main_visualization.py`` through its own ``main()``: ``ground(method="authors")``.

    python bench/authors_grounding.py --authors PATH/TO/ECAMP-checkout --authors-pythonpath DIR \\
        --checkpoint ecamp.pth --image film.png --tokenizer tokenizer.json --text "large left pleural effusion" \\
        --out reference.npz [--token 4] [--shuffled]

The checkout's ``Visualization/`` folder is put first on the path and ``main_visualization.main(args)`` runs with
the arguments of their ``run.sh`` (``--model ecamp --norm_pix_loss --resume CHECKPOINT``); nothing of it is copied
here. Their README asks the user to replace two placeholders in the script, ``"TEXT INPUT"`` and ``"IMAGE PATH"``;
here their tokenizer's ``encode`` sees ``--text`` in place of the first and their ``pil_loader`` reads ``--image``
in place of the second, so their file stays unedited. Their working directory is a scratch folder whose
``./dataset/mimic_wordpiece.json`` is ``--tokenizer`` (their vocabulary is 30,000 ids; any tokenizer inside it fits)
and where their ``vis_original.png`` and ``vis_heatmap.png`` are written.

To run on the CPU, where missing: an empty ``ipdb`` whose ``set_trace`` returns (main() stops there once, before
writing its picture), ``np.float`` (NumPy 1.24 removed it; their ``util/pos_embed.py`` uses it), ``Tensor.cuda`` and
``Module.to("cuda")`` as no-ops, and transformers' import-time version check of its own pins skipped.
``--authors-pythonpath`` holds their transformers (``pip install --target DIR --no-deps transformers==4.42.4``):
their fusion layer calls BERT's attention with the positional arguments of transformers 4.

Their ``random_masking`` shuffles the patches even at ``mask_ratio=0`` (``torch.rand`` noise, no seed), and their
map is reshaped to 14x14 in that shuffled order. By default ``torch.rand`` returns increasing values during their
forward, which keeps the grid order (ecamp's map); ``--shuffled`` leaves it random (seed 0), their published
behaviour. The map their ``main()`` hands to the jet colormap (their final float array) and the uint8 pixels of
their ``vis_heatmap.png`` are saved to ``--out`` as ``canvas`` and ``blend``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def _child(cfg: dict) -> None:
    """In the authors' process: shims, placeholders, their main()."""
    import types
    import warnings

    import numpy as np

    vis = Path(cfg["authors"]) / "Visualization"
    sys.path.insert(0, str(vis))
    try:
        import ipdb  # noqa: F401
    except ImportError:
        shim = types.ModuleType("ipdb")
        shim.set_trace = lambda *a, **k: None
        sys.modules["ipdb"] = shim
    if not hasattr(np, "float"):
        np.float = float
    pin_check = types.ModuleType("transformers.dependency_versions_check")
    pin_check.dep_version_check = lambda *a, **k: None
    sys.modules.setdefault("transformers.dependency_versions_check", pin_check)
    warnings.filterwarnings("ignore")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import tokenizers
    import torch
    from PIL import Image

    torch.manual_seed(0)
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        to = torch.nn.Module.to

        def module_to(self, *args, **kwargs):
            dev = args[0] if args else kwargs.get("device")
            if dev is not None and torch.device(dev).type == "cuda":
                return self
            return to(self, *args, **kwargs)

        torch.nn.Module.to = module_to

    real_from_file = tokenizers.Tokenizer.from_file

    class _Placeholders:
        """Their tokenizer, with ``--text`` where their script has ``"TEXT INPUT"``."""

        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            return getattr(self._tok, name)

        def encode(self, text, *a, **k):
            return self._tok.encode(text.replace("TEXT INPUT", cfg["text"]), *a, **k)

    class _Tokenizer:
        @staticmethod
        def from_file(path):
            return _Placeholders(real_from_file(path))

    tokenizers.Tokenizer = _Tokenizer

    import main_visualization as mv

    real_loader = mv.pil_loader
    mv.pil_loader = lambda path: real_loader(cfg["image"] if path == "IMAGE PATH" else path)
    seen = {}
    get_cmap = plt.get_cmap

    def recording_cmap(name):
        cmap = get_cmap(name)

        def call(values, *a, **k):
            seen["canvas"] = np.array(values, dtype=np.float32)
            return cmap(values, *a, **k)

        return call

    plt.get_cmap = recording_cmap
    if not cfg["shuffled"]:
        real_rand = torch.rand

        def ordered(*size, **kw):  # their random_masking's noise: increasing, so patches keep the grid order
            shape = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
            n = int(np.prod(shape))
            return (torch.arange(n, dtype=torch.float32) / n).reshape(shape).to(kw.get("device") or "cpu")

        torch.rand = ordered
    if cfg["token"] != 4:
        raise SystemExit("their script hard-codes token index 4")
    args = mv.get_args_parser().parse_args(["--model", "ecamp", "--norm_pix_loss", "--resume", cfg["checkpoint"]])
    mv.main(args)
    if not cfg["shuffled"]:
        torch.rand = real_rand
    blend = np.asarray(Image.open("vis_heatmap.png"))
    np.savez_compressed(cfg["out"], canvas=seen["canvas"], blend=blend)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--authors", required=True, metavar="CHECKOUT", help="a ToniChopp/ECAMP checkout")
    p.add_argument("--authors-pythonpath", required=True, metavar="DIR", help="their transformers==4.42.4")
    p.add_argument("--checkpoint", required=True, help="an authors'-format .pth (ecamp train export --format authors)")
    p.add_argument("--image", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizers JSON, their ./dataset/mimic_wordpiece.json")
    p.add_argument("--text", required=True)
    p.add_argument("--token", type=int, default=4)
    p.add_argument("--shuffled", action="store_true", help="keep their random patch shuffle")
    p.add_argument("--out", required=True)
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(json.loads(args.child))
        return
    checkout = Path(args.authors)
    if not (checkout / "Visualization" / "main_visualization.py").is_file():
        raise SystemExit(f"{checkout} is not a checkout of ToniChopp/ECAMP (no Visualization/main_visualization.py)")
    cfg = {"authors": str(checkout.resolve()), "checkpoint": str(Path(args.checkpoint).resolve()),
           "image": str(Path(args.image).resolve()), "text": args.text, "token": args.token,
           "shuffled": args.shuffled, "out": str(Path(args.out).resolve())}
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "dataset").mkdir()
        shutil.copy(args.tokenizer, Path(work) / "dataset" / "mimic_wordpiece.json")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(args.authors_pythonpath).resolve()),
                                                             os.environ.get("PYTHONPATH", "")])}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(cfg),
                        "--authors", ".", "--authors-pythonpath", ".", "--checkpoint", ".", "--image", ".",
                        "--tokenizer", ".", "--text", ".", "--out", "."], cwd=work, env=env, check=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
