"""Where a sentence lies on a film, and finding scores without labels, from the full pre-training model.

ECAMP's text side is a masked-language model that reads the image through one cross-attention (fusion) layer;
it has no contrastive head, so there is no CLIP-style image-text similarity. Everything here is computed from
that language model: its cross-attention, and the likelihood it gives a report's words with and without parts
of the film.

:func:`ground` maps a sentence onto the film's own pixel grid, as :func:`ecamp.explain.explain` does, by one of:

* ``"occlusion"`` (default): each square region of patches (``region`` cells) is hidden from the fusion layer,
  and the drop in the log-likelihood of the sentence's finding words (masked) is that region's relevance; each
  patch gets the mean drop of the regions that cover it. The rule of ``ecamp train sr-windows`` that measured
  best, turned from "which window to keep" into "which region matters".
* ``"authors"``: the computation of the authors' ``Visualization/main_visualization.py``: the film squashed to the
  encoder's input size (``Resize((224, 224))``, ``CenterCrop``, ``Grayscale(3)``, ``Normalize(0.4722, 0.3028)``),
  ``'[CLS] ' + text``, the fusion layer's cross-attention of one token (index 4 by default, as they hard-coded),
  maximum over heads, to the power 0.25, min-max scaled, bilinearly resized (``align_corners=False``). One
  difference: their forward keeps MAE's random shuffle of the patches at ``mask_ratio=0``, so the map they reshape
  to 14x14 is a random permutation of the patches, different on every run; here the patches are in grid order.
* ``"gradient"``: gradient-weighted cross-attention (attention x d log-likelihood / d attention, positive part,
  mean over heads, summed over the scored words).

:func:`score_findings` scores each film for each finding phrase by the same likelihood (see its docstring). The
figures of both on phantom films are in ``docs/predicting.md``; ``bench/grounding_phantom.py`` regenerates them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidArgumentError, ModelFolderError

__all__ = ["METHODS", "BASELINES", "AUTHORS_TOKEN", "ground", "save_grounding", "authors_blend", "score_findings"]

METHODS = ("occlusion", "authors", "gradient")
BASELINES = ("negated", "blank")
AUTHORS_TOKEN = 4  # the token index hard-coded in the authors' visualisation
_AUTHORS_MEAN, _AUTHORS_STD = 0.4722, 0.3028  # their visualisation's Normalize


# -- the machinery shared with `ecamp train sr-windows` ----------------------------------------------------------------
def box_sums(values: np.ndarray | torch.Tensor, window: int):
    """Sums over every ``window`` x ``window`` square of ``[..., g, g]`` maps: ``[..., g-window+1, g-window+1]``."""
    t = torch.as_tensor(values, dtype=torch.float64)
    c = F.pad(t, (1, 0, 1, 0)).cumsum(-2).cumsum(-1)
    sums = c[..., window:, window:] - c[..., :-window, window:] - c[..., window:, :-window] + c[..., :-window, :-window]
    return sums.numpy() if isinstance(values, np.ndarray) else sums


def window_index(grid: int, window: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[n*n, window*window]`` patch indices of every ``window`` x ``window`` square of a ``grid`` x ``grid``
    patch grid (row-major over top-left offsets, ``n = grid - window + 1``)."""
    n = grid - window + 1
    cells = torch.arange(window, device=device)
    rows = []
    for top in range(n):
        for left in range(n):
            rows.append(((top + cells)[:, None] * grid + (left + cells)[None, :]).reshape(-1))
    return torch.stack(rows)


def target_positions(enc: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: the entity tokens and their descriptors (the finding mentions) of tokenised reports
    (``enc``: the :class:`ecamp.text.ReportEncoder` whose tables define them)."""
    from .text.report import mask_tokens

    ids = input_ids.cpu().numpy()
    out = np.zeros(ids.shape, dtype=bool)
    never = np.ones(ids.shape[1])
    for b, row in enumerate(ids):
        _, desc, ent = mask_tokens(row, never, never, is_continuation=enc.is_continuation, is_entity=enc.is_entity,
                                   dot_id=enc.dot_id, mask_id=enc.mask_id, pad_id=enc.pad_id, cfg=enc.config)
        if ent.size:
            out[b, ent] = True
            out[b, desc] = True
    return torch.from_numpy(out).to(input_ids.device) & (attention_mask > 0)


class CrossAttention:
    """Keeps attention probabilities while active: the fusion layer's cross-attention ``cross`` ``[B, heads, T,
    patches]`` (eager BERT attention returns them) and, with ``encoder=True``, each image block's softmax in
    ``blocks`` (its ``attn_drop`` input, timm's fused attention switched off). Everything is restored on exit."""

    def __init__(self, model: Any, encoder: bool = False):
        self.model, self.encoder = model, encoder
        self.blocks: list[torch.Tensor] = []

    def __enter__(self) -> CrossAttention:
        fusion = self.model.text.context_fusion_layer
        self._impl = self.model.text.bert_config._attn_implementation
        self.model.text.bert_config._attn_implementation = "eager"  # only eager attention returns probabilities
        fusion.keep_attention = True
        self._hooks, self._fused = [], []
        if self.encoder:
            for blk in self.model.encoder.blocks:
                self._fused.append(blk.attn.fused_attn)
                blk.attn.fused_attn = False
                self._hooks.append(blk.attn.attn_drop.register_forward_hook(
                    lambda _m, _a, out: self.blocks.append(out.detach())))
        return self

    def __exit__(self, *exc: object) -> None:
        fusion = self.model.text.context_fusion_layer
        fusion.keep_attention = False
        fusion.last_cross_attention = None
        self.model.text.bert_config._attn_implementation = self._impl
        for h in self._hooks:
            h.remove()
        for blk, fused in zip(self.model.encoder.blocks, self._fused, strict=False):
            blk.attn.fused_attn = fused

    @property
    def cross(self) -> torch.Tensor:
        return self.model.text.context_fusion_layer.last_cross_attention


def encode_patches(model: Any, images: torch.Tensor) -> torch.Tensor:
    """Projected patch tokens ``[B, grid*grid, text_hidden]`` of all patches in grid order (row-major). Images
    larger than the encoder's input (the SR resolution) are downsampled as in pre-training."""
    cfg = model.config
    if images.shape[-1] != cfg.img_size or images.shape[-2] != cfg.img_size:
        images = F.interpolate(images, size=(cfg.img_size, cfg.img_size), mode="bicubic", align_corners=False,
                               antialias=cfg.encoder_resize_antialias)
    # ascending noise keeps every patch in grid order (random_masking keeps the smallest noise first)
    order = torch.arange(cfg.grid**2, dtype=torch.float32, device=images.device).expand(images.shape[0], -1)
    latent, _, _, _ = model.forward_encoder(images, 0.0, order)
    return model.bert_mlp(latent)[:, 1:]


def log_likelihood(logits: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``[B]`` summed log-probability of the true tokens at the target positions."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[..., None]).squeeze(-1)
    return (logp * targets).sum(-1)


def _masked(ids: torch.Tensor, targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    return torch.where(targets, torch.full_like(ids, mask_id), ids)


def visible_likelihoods(model: Any, tokens: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor,
                        targets: torch.Tensor, mask_id: int, visible: torch.Tensor, chunk: int = 64
                        ) -> torch.Tensor:
    """``[B, K]``: the log-likelihood of each report's masked targets when the fusion layer sees only the patches
    ``visible[k]`` (``[K, n]`` indices) and their mean as the global token; forward passes only, ``chunk``
    variants at a time."""
    b, k = tokens.shape[0], visible.shape[0]
    masked = _masked(ids, targets, mask_id)
    out = []
    for s in range(0, k, chunk):
        idx = visible[s:s + chunk]
        kk = idx.shape[0]
        seen = tokens[:, idx].reshape(b * kk, idx.shape[1], -1)  # [B*kk, n, H]
        r_ids, r_masked = ids.repeat_interleave(kk, 0), masked.repeat_interleave(kk, 0)
        logits = model.text(r_masked, attention_mask.repeat_interleave(kk, 0), torch.zeros_like(r_ids), seen,
                            seen.mean(1, keepdim=True))
        out.append(log_likelihood(logits, r_ids, targets.repeat_interleave(kk, 0)).reshape(b, kk))
    return torch.cat(out, 1)


def gradient_relevance(model: Any, tokens: torch.Tensor, ids: torch.Tensor, attention_mask: torch.Tensor,
                       targets: torch.Tensor, mask_id: int) -> torch.Tensor:
    """``[B, patches]``: gradient-weighted cross-attention (positive part, mean over heads) summed over the
    masked targets."""
    masked = _masked(ids, targets, mask_id)
    with torch.enable_grad(), CrossAttention(model) as att:
        logits = model.text(masked, attention_mask, torch.zeros_like(ids), tokens, tokens.mean(1, keepdim=True))
        cross = att.cross
        # the gradient with respect to the attention only: the model's parameter gradients stay untouched
        (grad,) = torch.autograd.grad(log_likelihood(logits, ids, targets).sum(), cross)
        relevance = (grad * cross).clamp_min(0).mean(1)  # [B, T, P]
    return (relevance * targets[..., None]).sum(1).detach()


# -- inputs -----------------------------------------------------------------------------------------------------------
def _check_model(model: Any) -> None:
    if not (hasattr(model, "text") and hasattr(model, "forward_encoder") and hasattr(model, "config")):
        raise InvalidArgumentError(f"Grounding a sentence needs the full pre-training model (image encoder and text "
                                   f"side), got {type(model).__name__}: load it with ecamp.load_pretrain(name).")


def _report_encoder(model: Any, tokenizer: Any):
    """The :class:`ecamp.text.ReportEncoder` of the model's own tokenizer (``tokenizer.json`` beside its weights)."""
    from .text import ReportEncoder

    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer_path", None)
        folder = getattr(model, "source_folder", None)
        if tokenizer is None and folder is not None and (Path(folder) / "tokenizer.json").is_file():
            tokenizer = Path(folder) / "tokenizer.json"
        if tokenizer is None:
            raise ModelFolderError("The pre-training model has no tokenizer.json beside its weights; pass "
                                   "tokenizer= (the tokenizers JSON it was trained with).")
    return ReportEncoder(tokenizer, max_length=model.config.max_text_len)


def _tokenize(enc: Any, text: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgumentError(f"The text to ground must be a non-empty sentence, got {text!r:.60}.")
    ids, mask = enc.tokenize(text)
    return torch.from_numpy(ids)[None].to(device), torch.from_numpy(mask)[None].to(device)


def _word_positions(enc: Any, ids: torch.Tensor, word: str) -> list[int]:
    """The positions of the word's first occurrence (all its word pieces) in the tokenised text."""
    specials = {enc.pad_id, enc.cls_id}
    pieces = [i for i in enc.tokenizer.encode(word).ids if i not in specials]
    row = ids[0].tolist()
    for start in range(1, len(row) - len(pieces) + 1):
        if pieces and row[start:start + len(pieces)] == pieces:
            return list(range(start, start + len(pieces)))
    words = [enc.tokenizer.id_to_token(i) for i in row if i not in specials]
    raise InvalidArgumentError(f"The word {word!r} is not in the text; its tokens are {words}. Pass one of them "
                               f"or --token N.")


def _targets(enc: Any, ids: torch.Tensor, mask: torch.Tensor, method: str, token: int | None,
             word: str | None) -> torch.Tensor:
    """``[1, T]`` bool: the positions scored."""
    n = int(mask.sum())
    out = torch.zeros_like(ids, dtype=torch.bool)
    if token is not None:
        if not 0 <= token < ids.shape[1]:
            raise InvalidArgumentError(f"Token {token} is out of range: the text is tokenised to {ids.shape[1]} "
                                       f"positions (0 is [CLS]).")
        out[0, token] = True
    elif word is not None:
        out[0, _word_positions(enc, ids, word)] = True
    elif method == "authors":
        out[0, AUTHORS_TOKEN] = True
    else:
        out = target_positions(enc, ids, mask)
        if not out.any():  # no finding entity: every word of the sentence
            out[0, 1:n] = True
            out &= ids != enc.dot_id
    if method != "authors" and not bool((out & (mask > 0)).any()):
        raise InvalidArgumentError("The chosen token is padding; choose a position inside the text (--token or "
                                   "--word).")
    return out


def _pretrain_view(model: Any):
    """The eval transform matching how the pre-training reader saw films: squashed to the SR resolution (bicubic),
    grey, normalised with the training data's mean and std."""
    from .transforms import transform_from_cfg

    cfg = model.config
    block = model.ecamp_cfg.to_dict() if getattr(model, "ecamp_cfg", None) is not None else {}
    data = dict(block.get("data") or {})
    if data.get("image_policy"):
        block["image_policy"] = data["image_policy"]
    block["grayscale"] = True
    mean, std = float(data.get("mean", 0.4721)), float(data.get("std", 0.3037))
    return transform_from_cfg({"input_size": (3, cfg.sr_img_size, cfg.sr_img_size), "interpolation": "bicubic",
                               "crop_pct": 1.0, "crop_mode": "squash", "mean": (mean,) * 3, "std": (std,) * 3,
                               "ecamp": block})


def _authors_rgb(view: Any):
    """The file as the 8-bit RGB PIL image their ``pil_loader`` makes (deeper files rounded to 8 bits)."""
    from PIL import Image

    from .transforms import to_uint8

    if isinstance(view, Image.Image):
        if view.mode == "F":
            view = Image.fromarray(to_uint8(np.asarray(view, dtype=np.float32)))
        return view.convert("RGB")
    return Image.fromarray(to_uint8(view.permute(1, 2, 0).numpy()))  # a deep colour [3, H, W] tensor


# -- ground -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Grounding:
    heat: np.ndarray  # float32 [H, W] in [0, 1] on the film's grid
    film: np.ndarray  # float32 [H, W] in [0, 1]
    seen: np.ndarray  # bool [H, W]
    method: str
    words: tuple[str, ...]  # the tokens scored
    canvas: np.ndarray | None = None  # authors: their [S, S] map
    canvas_film: np.ndarray | None = None  # authors: their [S, S, 3] uint8 grey film


def ground(model: nn.Module, image: Any, text: str, *, method: str = "occlusion", token: int | None = None,
           word: str | None = None, authors_canvas: bool = False, region: int | None = None,
           tokenizer: Any = None) -> np.ndarray:
    """Where ``text`` lies on ``image``: float32 ``[H, W]`` in [0, 1] on the image's own pixels.

    Args:
        model: the full pre-training model, ``ecamp.load_pretrain(name)``.
        image: a path (DICOM, PNG, JPEG, TIFF), bytes, a file object, a numpy array or a PIL image.
        text: the sentence, e.g. ``"left pleural effusion"``.
        method: ``"occlusion"``, ``"authors"`` or ``"gradient"`` (module docstring).
        token: score this token position of ``'[CLS] ' + text`` (0 is ``[CLS]``) instead of the default
            (``"authors"``: index 4; the others: the finding words, or every word if none is a finding).
        word: score this word (all its word pieces; ``"authors"``: its first piece) instead.
        authors_canvas: ``"authors"`` only: return their ``[S, S]`` map on the squashed input (S = the encoder's
            input size, 224 for ECAMP-B), which equals their script's array.
        region: ``"occlusion"``: the side of the hidden square in patches (default a quarter of the grid).
        tokenizer: the tokenizers JSON (default the model folder's ``tokenizer.json``).
    """
    result = _ground(model, image, text, method=method, token=token, word=word, region=region, tokenizer=tokenizer,
                     authors_canvas=authors_canvas)
    return result.canvas if authors_canvas else result.heat


def _ground(model: nn.Module, image: Any, text: str, *, method: str, token: int | None, word: str | None,
            region: int | None, tokenizer: Any, authors_canvas: bool) -> _Grounding:
    from .maps import film_to_input, grey_film, minmax, to_film
    from .transforms import to_pil

    _check_model(model)
    if method not in METHODS:
        raise InvalidArgumentError(f"Unknown grounding method {method!r}; use one of {METHODS}.")
    if token is not None and word is not None:
        raise InvalidArgumentError("Pass token or word, not both.")
    if authors_canvas and method != "authors":
        raise InvalidArgumentError("authors_canvas is the authors' 224-pixel picture: use it with method='authors'.")
    g = model.config.grid
    if region is not None and (method != "occlusion" or not 1 <= region < g):
        raise InvalidArgumentError(f"region (occlusion only) must be 1..{g - 1} patches, got {region}.")
    enc = _report_encoder(model, tokenizer)
    param = next(model.parameters())
    ids, mask = _tokenize(enc, text, param.device)
    targets = _targets(enc, ids, mask, method, token, word)
    if method == "authors" and word is not None:  # one token, as their map is: the word's first piece
        first = int(targets[0].nonzero()[0, 0])
        targets = torch.zeros_like(targets)
        targets[0, first] = True
    words = tuple(enc.tokenizer.id_to_token(int(i)) for i in ids[0][targets[0]])
    cfg_policy = (getattr(model, "ecamp_cfg", None) and (model.ecamp_cfg.data or {}).get("image_policy")) or "bits"
    view = to_pil(image, policy=cfg_policy)
    film = grey_film(view)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if method == "authors":
                return _authors(model, view, film, ids, mask, targets, words)
            tf = _pretrain_view(model)
            x = tf(view)[None].to(device=param.device, dtype=param.dtype)
            tokens = encode_patches(model, x)
            if method == "gradient":
                patch = gradient_relevance(model, tokens, ids, mask, targets, enc.mask_id)[0].reshape(g, g)
            else:
                patch = _occlusion_map(model, tokens, ids, mask, targets, enc.mask_id, region or max(1, g // 4))
    finally:
        model.train(was_training)
    heat, seen = to_film(minmax(patch.float()), x.shape[-2:], film_to_input(tf, view, film.shape), film.shape)
    return _Grounding(heat, film, seen, method, words)


def _occlusion_map(model, tokens, ids, mask, targets, mask_id, region: int) -> torch.Tensor:
    """``[g, g]``: each patch's mean log-likelihood drop over the hidden ``region`` squares that cover it."""
    g = model.config.grid
    hidden = window_index(g, region, tokens.device)  # [K, r*r]
    everything = torch.arange(g * g, device=tokens.device)
    keep = torch.stack([everything[~torch.isin(everything, h)] for h in hidden])  # [K, g*g - r*r]
    full = visible_likelihoods(model, tokens, ids, mask, targets, mask_id, everything[None])[0, 0]
    drop = full - visible_likelihoods(model, tokens, ids, mask, targets, mask_id, keep)[0]  # [K]
    member = torch.zeros(hidden.shape[0], g * g, device=tokens.device).scatter_(1, hidden, 1.0)
    per_patch = (drop.float() @ member) / member.sum(0)
    return per_patch.clamp_min(0).reshape(g, g)


def _authors(model, view, film, ids, mask, targets, words) -> _Grounding:
    from torchvision import transforms as T

    from .maps import to_film

    size, g = model.config.img_size, model.config.grid
    rgb = _authors_rgb(view)
    geometry = [T.Resize((size, size)), T.CenterCrop((size, size)), T.Grayscale(num_output_channels=3)]
    canvas_film = np.array(T.Compose(geometry)(rgb))
    x = T.Compose([*geometry, T.ToTensor(), T.Normalize(mean=[_AUTHORS_MEAN], std=[_AUTHORS_STD])])(rgb)[None]
    param = next(model.parameters())
    tokens = encode_patches(model, x.to(device=param.device, dtype=param.dtype))
    index = int(targets[0].nonzero()[0, 0])
    with CrossAttention(model) as att:
        model.text(ids, mask, torch.zeros_like(ids), tokens, tokens.mean(1, keepdim=True))
        cross = att.cross[0, :, index].float().cpu()  # [heads, patches]
    a = cross.reshape(-1, g, g).amax(0) ** 0.25
    a = (a - a.min()) / (a.max() - a.min())  # their min-max (a constant map is their division by zero too)
    canvas = F.interpolate(a[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
    h, w = film.shape
    heat, seen = to_film(a.clamp(0, 1), (size, size), (size / h, 0.0, size / w, 0.0), film.shape)
    return _Grounding(heat, film, seen, "authors", words, canvas.numpy().astype(np.float32), canvas_film)


# -- the picture ------------------------------------------------------------------------------------------------------
_NAMES = {"occlusion": "occlusion (log-likelihood drop when a region is hidden)",
          "authors": "the authors' cross-attention map", "gradient": "gradient-weighted cross-attention"}


def save_grounding(model: nn.Module, image: Any, text: str, out: str | os.PathLike, *, method: str = "occlusion",
                   token: int | None = None, word: str | None = None, authors_canvas: bool = False,
                   region: int | None = None, tokenizer: Any = None, model_name: str | None = None,
                   boxes: Sequence[tuple[str, tuple[float, float, float, float]]] = ()) -> dict[str, Any]:
    """:func:`ground` one image and write it as the PNG ``out``: the film with its map, a colorbar, and a title
    naming the model, the method, the sentence and the words scored. ``authors_canvas``: their picture instead,
    the 224-pixel blend (0.5 film, 0.5 jet) as their script writes it. ``boxes``: ``(label, (x1, y1, x2, y2))``
    in film pixels to outline (e.g. a phantom's finding boxes). Returns ``{"out", "method", "words"}``."""
    from .config import ecamp_cfg_of
    from .maps import figure_class, new_figure, overlay, save_figure
    from .outputs import check_output

    out = Path(out)
    if out.suffix.lower() != ".png":
        raise InvalidArgumentError(f"Output {out} must end in .png.", path=out)
    check_output(out)  # a missing or read-only folder, or a folder named out
    if not authors_canvas:
        figure_class()  # before the work: a missing extra fails fast
    result = _ground(model, image, text, method=method, token=token, word=word, region=region, tokenizer=tokenizer,
                     authors_canvas=authors_canvas)
    if authors_canvas:
        from PIL import Image

        from .fileio import atomic_write

        blended = authors_blend(result.canvas_film, result.canvas)
        atomic_write(out, lambda tmp: Image.fromarray(blended).save(tmp, format="PNG"))
        return {"out": str(out), "method": result.method, "words": list(result.words)}
    name = model_name or ecamp_cfg_of(model).name or type(model).__name__
    h, w = result.film.shape
    fig = new_figure(figsize=(6.4, max(3.4, 5.2 * h / w)))
    ax = fig.subplots()
    said = text if len(text) <= 60 else text[:57] + "..."
    title = f"{name}\n{_NAMES[method]}\n\"{said}\" · words scored: {' '.join(result.words)}"
    overlay(result.film, np.ma.masked_where(~result.seen, result.heat), ax=ax, title=title,
            colorbar=f"{method} relevance (scaled to [0, 1])")
    if boxes:
        from matplotlib.patches import Rectangle

        for k, (label, (x1, y1, x2, y2)) in enumerate(boxes):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, ec="white", lw=1.4, ls="--",
                                   label="finding box" if k == 0 else None))
            ax.text(x1, max(y1 - 3, 8), label, color="white", fontsize=8)
        ax.legend(loc="lower right", fontsize=8)
    save_figure(fig, out)
    return {"out": str(out), "method": result.method, "words": list(result.words)}


def authors_blend(canvas_film: np.ndarray, canvas: np.ndarray) -> np.ndarray:
    """Their picture: the jet colours of the map blended 0.5/0.5 with the film, as uint8 ``[S, S, 3]``."""
    from .maps import figure_class

    figure_class()
    from matplotlib import colormaps

    colour = (colormaps["jet"](canvas)[:, :, :3] * 255).astype(np.uint8)
    return (0.5 * canvas_film + 0.5 * colour).astype(np.uint8)


# -- finding scores ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def score_findings(model: nn.Module, images: Sequence[Any], findings: Sequence[str], *, baseline: str = "negated",
                   batch_size: int = 16, tokenizer: Any = None) -> np.ndarray:
    """Experimental: ``[len(images), len(findings)]`` float64 scores, higher where the film supports the finding.

    For each film and finding phrase (e.g. ``"pleural effusion"``), the log-likelihood the pre-training model gives
    the phrase's words (all masked at once) with the film, minus ``baseline``:

    * ``"negated"`` (default): the same for ``"no " + finding`` with the same film, so the film's support for the
      finding is weighed against its support for the finding's absence;
    * ``"blank"``: the phrase with a blank (mean-grey) film; a constant per finding, so it moves the scores' zero
      point only and ranks films exactly as the bare likelihood does.

    These are masked-language-model likelihoods, not calibrated probabilities and not CLIP-style similarities:
    they rank films for one finding; comparing scores across findings compares phrase likelihoods.
    """
    _check_model(model)
    if baseline not in BASELINES:
        raise InvalidArgumentError(f"Unknown baseline {baseline!r}; use one of {BASELINES}.")
    findings = list(findings)
    if not findings or not all(isinstance(f, str) and f.strip() for f in findings):
        raise InvalidArgumentError("findings must be a non-empty list of phrases, e.g. ['pleural effusion'].")
    images = list(images)
    if not images:
        raise InvalidArgumentError("images is empty; pass at least one film.")
    enc = _report_encoder(model, tokenizer)
    param = next(model.parameters())
    tf = _pretrain_view(model)
    phrases = [[f.strip()] + ([f"no {f.strip()}"] if baseline == "negated" else []) for f in findings]
    texts = [_tokenize(enc, t, param.device) for group in phrases for t in group]
    ids = torch.cat([t[0] for t in texts])
    mask = torch.cat([t[1] for t in texts])
    targets = (mask > 0) & (ids != enc.cls_id) & (ids != enc.dot_id)
    was_training = model.training
    model.eval()
    try:
        def likelihoods(tokens: torch.Tensor) -> torch.Tensor:  # [B, texts]
            b, n = tokens.shape[0], ids.shape[0]
            rep = lambda t: t.repeat(b, 1)  # noqa: E731  rows: film-major
            tok = tokens.repeat_interleave(n, 0)
            logits = model.text(rep(_masked(ids, targets, enc.mask_id)), rep(mask), torch.zeros_like(rep(ids)),
                                tok, tok.mean(1, keepdim=True))
            return log_likelihood(logits, rep(ids), rep(targets)).reshape(b, n).double()

        if baseline == "blank":
            blank = encode_patches(model, torch.zeros(1, 3, model.config.sr_img_size, model.config.sr_img_size,
                                                      device=param.device, dtype=param.dtype))
            base = likelihoods(blank)[0]
        rows = []
        for s in range(0, len(images), batch_size):
            x = torch.stack([tf(img) for img in images[s:s + batch_size]]).to(device=param.device, dtype=param.dtype)
            ll = likelihoods(encode_patches(model, x))
            rows.append(ll - base if baseline == "blank" else ll[:, 0::2] - ll[:, 1::2])
    finally:
        model.train(was_training)
    return torch.cat(rows).cpu().numpy()
