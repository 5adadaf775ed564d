"""Where a model looks: attention rollout for encoders, Grad-CAM for classifiers, as a map over the original film.

:func:`explain` runs the model on its own preprocessing (:func:`ecamp.get_transform`: DICOM, 16-bit PNG,
MONOCHROME1 and the intensity policy handled as for embedding) and maps the result back through the transform's
resize and centre crop, so the map has the film's own pixel grid and lies on the film. Parts of the film that the
crop cut away are 0: the model never saw them.

* ``rollout`` (encoders, ``num_classes=0``): attention rollout (Abnar & Zuidema, 2020) over every block. The
  attention matrices come from forward hooks on each block's ``attn.qkv`` linear, which recompute softmax(qk^T) from
  its output; timm's fused attention keeps running and nothing in timm is changed.
* ``gradcam`` (classifiers): Grad-CAM through the ``grad-cam`` package (``pytorch_grad_cam``) on the patch tokens,
  for a class index or label name (default: the top class).

Plots (:func:`overlay`, :func:`save_overlay`) and Grad-CAM need the ``plot`` extra: ``pip install "ecamp[plot]"``.

:func:`ground` (where a sentence lies on a film) and :func:`score_findings` take the full pre-training model
instead (``ecamp.load_pretrain``); they live in :mod:`ecamp.grounding`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import InvalidArgumentError, MissingDependencyError
from .grounding import ground, save_grounding, score_findings  # sentences on films: the full pre-training model
from .maps import PLOT_EXTRA, figure_class, film_to_input, grey_film, minmax, new_figure, overlay, save_figure, to_film

__all__ = ["METHODS", "default_method", "explain", "overlay", "new_figure", "save_figure", "save_overlay", "ground",
           "save_grounding", "score_findings"]

METHODS = ("rollout", "gradcam")


@dataclass(frozen=True)
class _Explanation:
    heat: np.ndarray  # float32 [H, W] in [0, 1], the film's grid
    film: np.ndarray  # float32 [H, W] in [0, 1], the film as the model's intensity policy reads it
    seen: np.ndarray  # bool [H, W]: the film pixels inside the model's input (False: cropped away)
    method: str
    target: str | None  # the class explained (Grad-CAM), None for rollout


def default_method(model: nn.Module) -> str:
    """``"gradcam"`` for a model with a classification head, ``"rollout"`` for an encoder."""
    return "gradcam" if getattr(model, "num_classes", 0) else "rollout"


def explain(model: nn.Module, image: Any, *, target: int | str | None = None, method: str | None = None,
            transform: Any = None) -> np.ndarray:
    """The model's relevance map of one image, as float32 ``[H, W]`` in [0, 1] on the original image's pixels.

    Args:
        model: a timm ViT, e.g. ``ecamp.load(name)`` (an encoder) or ``ecamp.load(name, num_classes=C)`` fine-tuned.
        image: a path (DICOM, PNG, JPEG, TIFF), bytes, a binary file object, a numpy array or a PIL image.
        target: Grad-CAM's class, an index or a label name (``model.label_names``, or timm's
            ``pretrained_cfg["label_names"]``); default the top class. Rollout is not class-specific and takes none.
        method: ``"rollout"`` or ``"gradcam"``; default :func:`default_method`.
        transform: the eval transform to use (default ``ecamp.get_transform(model)``).
    """
    return _explain(model, image, target=target, method=method, transform=transform).heat


def _explain(model: nn.Module, image: Any, *, target: int | str | None, method: str | None,
             transform: Any) -> _Explanation:
    from .factory import get_transform
    from .transforms import EcampTransform, to_pil

    method = default_method(model) if method is None else method
    if method not in METHODS:
        raise InvalidArgumentError(f"Unknown explain method {method!r}; use one of {METHODS}.")
    if method == "rollout" and target is not None:
        raise InvalidArgumentError("Attention rollout is not class-specific; pass a target with method='gradcam' "
                                   "on a classifier.")
    if method == "gradcam" and not getattr(model, "num_classes", 0):
        raise InvalidArgumentError("Grad-CAM needs a classification head, and this model has none (an encoder): "
                                   "use method='rollout', or a fine-tuned classifier.")
    tf = get_transform(model) if transform is None else transform
    if not isinstance(tf, EcampTransform) or tf.train:
        raise InvalidArgumentError("explain needs an eval-mode ecamp transform (ecamp.get_transform(model)): the map "
                                   "is mapped back through its geometry.")
    # read once: the view is what the transform starts from (policy applied), and what the plot shows
    view = to_pil(image, policy=tf.policy)
    film = grey_film(view)
    param = next(model.parameters())
    x = tf(view)[None].to(device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        if method == "rollout":
            grid, label = _rollout(model, x), None
        else:
            index, label = _target(model, x, target)
            grid = _gradcam(model, x, index)
    finally:
        model.train(was_training)
    heat, seen = to_film(grid, x.shape[-2:], film_to_input(tf, view, film.shape), film.shape)
    return _Explanation(heat, film, seen, method, label)


# -- geometry ---------------------------------------------------------------------------------------------------------


def _tokens(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(prefix tokens, grid rows, grid columns) of a timm ViT for input ``x``."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None or not hasattr(model, "blocks"):
        raise InvalidArgumentError(f"explain works on timm VisionTransformers (patch_embed and blocks); got "
                                   f"{type(model).__name__}.")
    return int(getattr(model, "num_prefix_tokens", 1)), x.shape[-2] // patch[0], x.shape[-1] // patch[1]


# -- attention rollout -----------------------------------------------------------------------------------------------
def _rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Attention rollout over every block as a min-max scaled ``[rows, cols]`` map of the patch tokens."""
    prefix, gh, gw = _tokens(model, x)
    maps: list[torch.Tensor] = []

    def hook(attn: nn.Module):
        def fn(module: nn.Module, inputs: Any, qkv: torch.Tensor) -> None:
            b, n, _ = qkv.shape
            q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)
            maps.append(((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1).mean(1)[0].float())  # heads averaged
        return fn

    attns = [getattr(blk, "attn", None) for blk in model.blocks]
    if not attns or not all(hasattr(a, "qkv") and hasattr(a, "num_heads") for a in attns):
        raise InvalidArgumentError(f"Attention rollout needs timm ViT blocks with a fused qkv projection "
                                   f"(blocks[i].attn.qkv); {type(model).__name__} has none.")
    handles = [a.qkv.register_forward_hook(hook(a)) for a in attns]
    try:
        with torch.no_grad():
            model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    n = maps[0].shape[-1]
    eye = torch.eye(n, device=maps[0].device)
    rollout = eye
    for a in maps:  # the residual path: half identity, rows still sum to 1
        rollout = (0.5 * a + 0.5 * eye) @ rollout
    if getattr(model, "global_pool", "avg") == "token":
        start = rollout[0]  # the class token's row is what the head sees
    else:
        # ECAMP encoders (timm global_pool="avg") pool the mean of the patch tokens, and the class token does not
        # reach the output: the relevance of the inputs to the pooled embedding is the mean of the patch rows
        start = rollout[prefix:].mean(0)
    if n - prefix != gh * gw:
        raise InvalidArgumentError(f"The model has {n - prefix} patch tokens for a {gh}x{gw} grid; explain needs "
                                   f"one token per patch.")
    # every row keeps at least 0.5**depth on itself, a floor shared by all tokens: min-max scaling removes it
    return minmax(start[prefix:].reshape(gh, gw))


# -- Grad-CAM ---------------------------------------------------------------------------------------------------------
def _target(model: nn.Module, x: torch.Tensor, target: int | str | None) -> tuple[int, str]:
    """The class index to explain and its display name."""
    names = [str(n) for n in getattr(model, "label_names", None)
             or (getattr(model, "pretrained_cfg", None) or {}).get("label_names") or []]
    n_classes = int(model.num_classes)
    if target is None:
        with torch.no_grad():
            index = int(model(x)[0].argmax())
    elif isinstance(target, str) and target in names:
        index = names.index(target)
    elif isinstance(target, str) and target.strip().isascii() and target.strip().isdigit():  # not "²"
        index = int(target)
    elif isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        index = int(target)
    else:
        known = f"its classes are {names}" if names else "it has no label names (save_pretrained(label_names=...))"
        raise InvalidArgumentError(f"Unknown target {target!r}; {known}. A class index 0..{n_classes - 1} works too.")
    if not 0 <= index < n_classes:
        raise InvalidArgumentError(f"Target {index} is out of range: the model has {n_classes} classes.")
    return index, names[index] if index < len(names) else f"class {index}"


def _gradcam(model: nn.Module, x: torch.Tensor, index: int) -> torch.Tensor:
    """Grad-CAM of class ``index`` on the patch tokens, ``[H, W]`` of the model input, scaled to [0, 1]."""
    try:
        from pytorch_grad_cam import GradCAM
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError as e:
        raise MissingDependencyError(f"Grad-CAM needs the grad-cam package: {PLOT_EXTRA}.") from e
    prefix, gh, gw = _tokens(model, x)

    def to_map(tokens: torch.Tensor) -> torch.Tensor:  # [B, N, C] -> [B, C, rows, cols], as grad-cam expects
        return tokens[:, prefix:].reshape(tokens.shape[0], gh, gw, tokens.shape[-1]).permute(0, 3, 1, 2)

    if getattr(model, "global_pool", "avg") == "token":
        # the class token pools: the last block's patch outputs never reach the head, its input does
        layer = model.blocks[-1].norm1
    else:
        # mean pooling: the head is linear in the mean of these tokens, so this is the class activation map
        layer = model.norm if not isinstance(model.norm, nn.Identity) else model.blocks[-1]
    with GradCAM(model=model, target_layers=[layer], reshape_transform=to_map) as cam:
        # requires_grad on the input: a frozen model's activations still carry gradients
        out = cam(input_tensor=x.detach().requires_grad_(True), targets=[ClassifierOutputTarget(index)])
    return torch.from_numpy(np.ascontiguousarray(out[0]))


# -- plots ------------------------------------------------------------------------------------------------------------


def save_overlay(model: nn.Module, image: Any, out: str | os.PathLike, *, target: int | str | None = None,
                 method: str | None = None, transform: Any = None, model_name: str | None = None) -> dict[str, Any]:
    """:func:`explain` one image and write the film with its map, a colorbar and a title (model, method, target)
    to the PNG ``out``. Returns ``{"out", "method", "target"}``."""
    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"Output {out} must end in .png.", path=out)
    from .outputs import check_output

    check_output(out)  # a missing or read-only folder, or a folder named out
    figure_class()  # before the work: a missing extra fails fast
    result = _explain(model, image, target=target, method=method, transform=transform)
    from .config import ecamp_cfg_of

    name = model_name or ecamp_cfg_of(model).name or type(model).__name__
    what = {"rollout": "attention rollout", "gradcam": "Grad-CAM"}[result.method]
    title = f"{name} · {what}" + (f" · {result.target}" if result.target else "")
    h, w = result.film.shape
    fig = new_figure(figsize=(6.4, max(3.0, 5.2 * h / w)))
    # the cropped-away margins stay uncoloured: the model never saw them
    overlay(result.film, np.ma.masked_where(~result.seen, result.heat), ax=fig.subplots(), title=title,
            colorbar="relevance (rollout, scaled to [0, 1])" if result.method == "rollout"
            else f"Grad-CAM of {result.target} (scaled to [0, 1])")
    save_figure(fig, out)
    return {"out": str(out), "method": result.method, "target": result.target}
