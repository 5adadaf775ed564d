"""Smoke test of an installed ecamp wheel (no extras), run by .ci/wheel_smoke.sh in a second virtual environment.

Not a pytest module: run it as ``python -I tests/helpers/smoke_wheel.py --checkout SRC --presets N`` from a folder
outside the checkout (``-I`` keeps the script's folder and PYTHON* variables off sys.path, so only the installed
package can be imported). It checks what a plain ``pip install ecamp`` promises:

* ``ecamp`` is imported from site-packages, never from the checkout;
* ``save_pretrained`` -> ``load("local-dir:...")`` -> ``get_transform`` -> ``embed`` work, and neither
  ``transformers`` nor ``tokenizers`` is installed (``--no-train-deps``) or imported;
* every preset shipped in the wheel is found by name, inside site-packages, without importing PyYAML
  or torch;
* ``ecamp convert`` turns an authors'-format checkpoint into a folder that ``ecamp.load`` reads (when
  ``ecamp.convert`` exists).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

BLOCKED = ("transformers", "tokenizers")


def step(msg: str) -> None:
    print(f"[wheel smoke {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def inside(path: str | Path, folder: str | Path) -> bool:
    return Path(path).resolve().is_relative_to(Path(folder).resolve())


def check_not_imported(where: str) -> None:
    loaded = [m for m in BLOCKED if m in sys.modules]
    assert not loaded, f"{where} imported {loaded}"


def tiny_encoder(seed: int = 0):
    """A small random ECAMP-style encoder (as tests/helpers/builders.py's make_tiny_encoder)."""
    import timm
    import torch

    import ecamp

    cfg = ecamp.get_pretrained_cfg("cxr-vit-b")
    block = cfg.pop("ecamp")
    cfg["input_size"] = [3, 64, 64]
    for key in ("hf_hub_id", "tag"):
        cfg.pop(key, None)
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg=cfg, num_classes=0,
                              global_pool="avg", fc_norm=False, embed_dim=48, depth=2, num_heads=3, img_size=64)
    block.pop("name", None)
    model.ecamp_cfg = block
    return model.eval()


def smoke_load_embed(tmp: Path) -> None:
    import numpy as np
    import torch

    import ecamp

    folder = tmp / "tiny-encoder"
    ecamp.save_pretrained(tiny_encoder(), folder, name="tiny-cxr")
    model = ecamp.load(f"local-dir:{folder}")
    tf = ecamp.get_transform(model)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (80, 96), dtype=np.uint8), rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)]
    x = tf(images[0])
    assert tuple(x.shape) == (3, 64, 64), x.shape
    z = ecamp.embed(model, images, batch_size=2, progress=False)
    assert z.shape == (2, 48) and np.isfinite(z).all(), z
    with torch.no_grad():
        direct = model(x[None]).numpy()
    np.testing.assert_allclose(z[:1], direct, rtol=1e-4, atol=1e-5)
    check_not_imported("load/get_transform/embed")
    step(f"save_pretrained -> load(local-dir) -> get_transform -> embed: {z.shape}")


def smoke_presets(site: Path, expected: int | None) -> None:
    from ecamp.errors import ConfigError
    from ecamp.train.presets import list_presets, preset_path

    presets = list_presets()
    names = [(kind, n) for kind, ns in presets.items() for n in ns]
    assert presets["pretrain"] and presets["finetune"], presets
    assert "mimic_cxr" in presets["pretrain"] and "phantom_tiny" in presets["pretrain"], presets
    if expected is not None:
        assert len(names) == expected, f"the wheel has {len(names)} presets, the checkout {expected}"
    for kind, name in names:
        path = preset_path(name, kind)
        assert path.is_file() and inside(path, site), f"{kind}/{name} -> {path}, not inside {site}"
    try:
        preset_path("no_such_preset", "pretrain")
    except ConfigError as e:
        assert "ecamp train presets" in str(e), e
    else:
        raise AssertionError("an unknown preset name did not raise ConfigError")
    code = ("import sys; from ecamp.train.presets import list_presets, preset_path; "
            "[preset_path(n, k) for k, ns in list_presets().items() for n in ns]; "
            "bad = [m for m in ('yaml', 'torch', *sys.argv[1:]) if m in sys.modules]; assert not bad, bad")
    out = subprocess.run([sys.executable, "-I", "-c", code, *BLOCKED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"finding presets imported more than importlib.resources needs:\n{out.stderr}"
    out = subprocess.run([sys.executable, "-I", "-m", "ecamp", "train", "presets"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, f"`ecamp train presets` failed ({out.returncode}):\n{out.stdout}\n{out.stderr}"
    missing = [n for _k, n in names if n not in out.stdout]
    assert not missing, f"`ecamp train presets` does not list {missing}:\n{out.stdout}"
    step(f"{len(names)} presets found by name inside {site}; `ecamp train presets` lists them")


def authors_checkpoint(path: Path, cfg) -> dict:
    """An authors'-format ``.pth``: ``{"model": state, "args": Namespace}`` with the ViT keys at the top level and
    some of the text and decoder keys the real checkpoint also holds (the encoder conversion ignores them)."""
    import torch

    from ecamp.models.encoder import build_encoder
    from ecamp.models.pretrain import encoder_config

    torch.manual_seed(1)
    vit = build_encoder(encoder_config(cfg, {})).state_dict()
    state = {k: v.clone() for k, v in vit.items()}
    state["bert_encoder.model.bert.embeddings.word_embeddings.weight"] = torch.zeros(cfg.vocab_size,
                                                                                    cfg.text_hidden_size)
    state["decoder_embed.weight"] = torch.zeros(cfg.decoder_embed_dim, cfg.embed_dim)
    torch.save({"model": state, "args": argparse.Namespace(epochs=1)}, path)
    return vit


def smoke_convert(tmp: Path) -> None:
    import torch

    import ecamp
    from ecamp.cli import main
    from ecamp.models.pretrain import ECAMPPretrainConfig

    cfg = ECAMPPretrainConfig.tiny()
    ckpt = tmp / "ECAMP_ViT_Base_16.pth"
    vit = authors_checkpoint(ckpt, cfg)
    (tmp / "tiny.json").write_text(json.dumps(cfg.to_dict()))
    out = subprocess.run([sys.executable, "-I", "-m", "ecamp", "convert", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "--name" in out.stdout, out.stdout + out.stderr
    folder = tmp / "converted"
    argv = ["convert", str(ckpt), "--name", "cxr-vit-b", "--out", str(folder), "--config", str(tmp / "tiny.json")]
    assert main(argv) == 0
    model = ecamp.load(f"local-dir:{folder}")
    got = model.state_dict()
    assert set(got) == set(vit), sorted(set(got) ^ set(vit))
    assert all(torch.equal(got[k], vit[k]) for k in vit)
    z = ecamp.embed(model, [torch.rand(3, 64, 64)], progress=False)
    assert z.shape == (1, cfg.embed_dim), z.shape
    check_not_imported("ecamp convert")
    step(f"ecamp convert <authors .pth> --name cxr-vit-b --out DIR -> {sorted(p.name for p in folder.iterdir())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", required=True, help="the source tree the wheel was built from")
    parser.add_argument("--presets", type=int, default=None, help="how many preset YAML files the checkout has")
    parser.add_argument("--no-train-deps", action="store_true",
                        help="also require that transformers and tokenizers are not installed at all")
    parser.add_argument("--convert", choices=("auto", "yes", "no"), default="auto",
                        help="smoke `ecamp convert` (auto: when ecamp.convert exists)")
    args = parser.parse_args()

    site = Path(sysconfig.get_paths()["purelib"])
    import ecamp

    assert inside(ecamp.__file__, site), f"ecamp imported from {ecamp.__file__}, not from {site}"
    assert not inside(ecamp.__file__, args.checkout), f"ecamp imported from the checkout: {ecamp.__file__}"
    assert not inside(Path.cwd(), args.checkout), "run the smoke test from outside the checkout"
    step(f"ecamp {ecamp.__version__} from {Path(ecamp.__file__).parent}")
    if args.no_train_deps:
        present = [m for m in BLOCKED if importlib.util.find_spec(m) is not None]
        assert not present, f"a core install of the wheel has {present} (should come with the [train] extra only)"
    with tempfile.TemporaryDirectory(prefix="ecamp-wheel-smoke-") as tmp:
        smoke_load_embed(Path(tmp))
        smoke_presets(site, args.presets)
        has_convert = importlib.util.find_spec("ecamp.convert") is not None
        if args.convert == "yes" or (args.convert == "auto" and has_convert):
            smoke_convert(Path(tmp))
        else:
            step("ecamp.convert not in this wheel: convert smoke skipped")
    check_not_imported("the wheel smoke test")
    step("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
