"""ecamp: pretrained ECAMP ViT-B/16 encoders for chest X-rays and fundus images.

>>> import ecamp
>>> model = ecamp.load("cxr-vit-b")          # timm VisionTransformer, eval mode, sha256-verified weights
>>> tf = ecamp.get_transform(model)          # the preprocessing the weights expect
>>> z = model(tf(image)[None])               # pooled embedding [1, 768]

The public names are imported lazily, so ``import ecamp`` stays cheap and torch loads on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import EcampError
from .version import __version__

_LAZY = {
    "load": "factory",
    "load_pretrain": "factory",
    "download": "factory",
    "get_pretrained_cfg": "factory",
    "list_models": "registry",
    "load_manifest": "registry",
    "get_transform": "factory",
    "save_pretrained": "folders",
    "verify": "integrity",
    "embed": "embedding",
    "push": "publish",
}
_SUBMODULES = ("errors", "config", "registry", "hub", "cards", "folders", "factory", "convert", "io", "transforms",
               "batching", "fundus", "embedding", "finetune", "integrity", "models", "text", "fileio", "cli", "predict",
               "publish", "explain", "export")

__all__ = ["__version__", "EcampError", *_LAZY, *_SUBMODULES]

if TYPE_CHECKING:  # pragma: no cover
    from .embedding import embed  # noqa: F401
    from .factory import download, get_pretrained_cfg, get_transform, load, load_pretrain  # noqa: F401
    from .folders import save_pretrained  # noqa: F401
    from .integrity import verify  # noqa: F401
    from .publish import push  # noqa: F401
    from .registry import list_models, load_manifest  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f".{name}", __name__)
        globals()[name] = module
        return module
    raise AttributeError(f"module 'ecamp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
