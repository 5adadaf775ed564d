"""Context-guided super-resolution windows (``ecamp train sr-windows``): where the evidence for a report's findings
lies in the image, as seen by a first-stage ECAMP model.

The authors' windows (``label_i, label_j``: the top-left cell of a 12x12 window on the 14x14 patch grid) came from a
script they did not publish. Every rule here runs the first stage with all patches visible, in grid order, feeds
the report (``[CLS]`` + report, no context) to the text side and scores the valid windows only, so a window outside
the grid cannot occur. The *targets* are the report's finding mentions: the entity tokens and their descriptors
(the up to two tokens before an entity, as the MLM weighting defines them), because the side and size of a finding
("left", "large") are descriptors. Reports without an entity get no window (empty labels), and the pre-training data
then uses ``data.default_window``.

``method``:

* ``"occlusion"`` (default): for each window, the log-likelihood of the masked targets when only that window's
  patches (and their mean, the global token) are visible to the fusion layer; the window whose patches best explain
  the words wins. Forward passes only, one per window, batched. Sign-consistent by construction: a head that looks
  at the normal lung cannot cancel it, because only the words' likelihood is scored.
* ``"gradient"``: gradient-weighted cross-attention (attention x d log-likelihood / d attention, positive part,
  mean over heads, summed over the masked targets), then the window with the largest sum.
* ``"rollout"``: head-mean cross-attention of the targets composed with the attention rollout of the image
  encoder (identity-augmented, head-mean, multiplied through the blocks), then the largest window sum.
* ``"max-heads"``: the fusion layer's cross-attention, maximum over heads, summed over the targets: the literal
  reading of the authors' visualisation. ``query`` chooses whether the targets hold their words (``"plain"``) or
  ``[MASK]`` (``"masked"``) when attention is read (``rollout`` and ``max-heads``; the other two always mask them).

Measured on 400 held-out phantoms with one lateralised finding each (``scripts/sr_windows_phantom.py``; table and
figures in ``docs/sr-windows.md``), with a demo-size first stage trained on the CPU: the window lies on the finding's
side for 0.78 of the films by occlusion, 0.64 by gradient, 0.29 by rollout and 0.20 by max-heads (chance 0.5; below
it, attention points at the normal lung), and equals the true window for 0.31 by occlusion against 0.305 for the
best constant window. That first stage reads the side word itself only weakly (AUROC 0.59 with the film, 0.57 with
a blank one); occlusion finds the side through the likelihood of the whole mention.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ecamp.errors import CheckpointError, InvalidArgumentError
from ecamp.fileio import write_csv
from ecamp.grounding import (
    CrossAttention,
    box_sums,
    encode_patches,
    gradient_relevance,
    target_positions,
    visible_likelihoods,
    window_index,
)
from ecamp.train.common.lists import LAYOUT_HINT, read_table
from ecamp.train.pretrain.config import DataConfig
from ecamp.train.pretrain.data import read_film
from ecamp.train.pretrain.windows import to_authors

# the reader settings an exported pre-training folder keeps (its ecamp block "data") for computing windows
_READER_FIELDS = ("image_policy", "image_root", "mean", "std")

__all__ = ["METHODS", "QUERIES", "WindowScores", "best_window", "box_sums", "compute_windows",
           "entity_attention_maps", "load_stage1", "phantom_agreement", "score_windows", "target_positions"]

METHODS = ("occlusion", "gradient", "rollout", "max-heads")
QUERIES = ("plain", "masked")


def best_window(attention: np.ndarray, window: int) -> tuple[int, int]:
    """Top-left cell of the ``window`` x ``window`` square with the largest sum on a [g, g] map."""
    sums = box_sums(attention, window)
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(top), int(left)


def load_stage1(source: str | Path) -> tuple[Any, Any, DataConfig]:
    """The model, tokenizer and data config (how its images were read) of an exported pre-training folder or of a
    training run / checkpoint. A folder exported without its data config reads images with the defaults."""
    from ecamp.models.pretrain import ECAMPPretrainModel
    from ecamp.text import load_tokenizer
    from ecamp.train.pretrain.export import model_from_checkpoint

    path = Path(source)
    if path.is_dir() and (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        model, folder = ECAMPPretrainModel.from_folder(path), path
        saved = model.ecamp_cfg.data
        data = dataclasses.replace(DataConfig(), **{k: saved[k] for k in _READER_FIELDS if k in saved})
    else:
        model, run_cfg, ckpt = model_from_checkpoint(path)
        folder, data = ckpt.parent, run_cfg.data
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; the first-stage model's tokenizer is needed.",
                              path=folder)
    return model.eval(), load_tokenizer(folder / "tokenizer.json"), data


@dataclasses.dataclass
class WindowScores:
    """Per report: ``scores [B, n, n]`` over the valid top-left offsets (higher wins), ``maps [B, g, g]`` a patch
    map for pictures, ``has_target [B]``."""

    scores: torch.Tensor
    maps: torch.Tensor
    has_target: torch.Tensor

    def best(self) -> list[tuple[int, int]]:
        n = self.scores.shape[-1]
        flat = self.scores.reshape(self.scores.shape[0], -1).argmax(-1).tolist()
        return [divmod(int(i), n) for i in flat]


def _occlusion(model, tokens, ids, attention_mask, targets, mask_id, window) -> tuple[torch.Tensor, torch.Tensor]:
    g = model.config.grid
    idx = window_index(g, window, tokens.device)  # [K, w*w]: only the window's patches are seen
    ll = visible_likelihoods(model, tokens, ids, attention_mask, targets, mask_id, idx)
    n = g - window + 1
    # patch map: the probability that a patch lies in the window, windows weighted by their likelihood
    post = torch.softmax(ll.double(), dim=-1).float()
    member = torch.zeros(idx.shape[0], g * g, device=tokens.device).scatter_(1, idx, 1.0)
    return ll.reshape(-1, n, n), (post @ member).reshape(-1, g, g)


def _rollout(blocks: list[torch.Tensor]) -> torch.Tensor:
    """Attention rollout ``[B, N, N]`` of an encoder: identity-augmented, head-mean, row-normalised, multiplied."""
    out = None
    for a in blocks:
        a = a.float().mean(1)
        a = 0.5 * a + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(-1, keepdim=True)
        out = a if out is None else a @ out
    return out


@torch.no_grad()
def score_windows(model: Any, enc: Any, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  *, method: str = "occlusion", query: str = "plain") -> WindowScores:
    """Window scores of a batch of films (``images`` at the SR resolution, read as for pre-training) and their
    tokenised reports, by ``method`` (module docstring)."""
    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}.")
    if query not in QUERIES:
        raise InvalidArgumentError(f"query must be one of {QUERIES}, got {query!r}.")
    cfg = model.config
    g, w = cfg.grid, cfg.sr_window
    targets = target_positions(enc, input_ids, attention_mask)
    has = targets.any(1)
    if method == "occlusion":
        tokens = encode_patches(model, images)
        scores, maps = _occlusion(model, tokens, input_ids, attention_mask, targets, enc.mask_id, w)
        return WindowScores(scores, maps, has)
    if method == "gradient":
        maps = gradient_relevance(model, encode_patches(model, images), input_ids, attention_mask, targets, enc.mask_id)
    else:
        with CrossAttention(model, encoder=method == "rollout") as att:
            tokens = encode_patches(model, images)
            ids = torch.where(targets, torch.full_like(input_ids, enc.mask_id), input_ids) if query == "masked" \
                else input_ids
            model.text(ids, attention_mask, torch.zeros_like(ids), tokens, tokens.mean(1, keepdim=True))
            cross = att.cross.float()  # [B, heads, T, P]
            if method == "max-heads":
                maps = (cross.amax(1) * targets[..., None]).sum(1)
            else:
                per_token = (cross.mean(1) * targets[..., None]).sum(1)  # [B, P] over the encoder's outputs
                maps = torch.einsum("bp,bpq->bq", per_token, _rollout(att.blocks)[:, 1:, 1:])
    maps = maps.reshape(-1, g, g)
    return WindowScores(box_sums(maps, w).float(), maps, has)


@torch.no_grad()
def entity_attention_maps(model: Any, enc: Any, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, *, query: str = "plain"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max-heads`` map from given image tokens: cross-attention ``[B, grid, grid]`` from the entity tokens
    (max over heads, summed over the entity positions) and a ``[B]`` bool of which reports have an entity.

    ``image_tokens`` are the projected patch tokens ``[B, grid*grid, text_hidden]`` in grid order (row-major);
    ``enc`` is the :class:`ecamp.text.ReportEncoder` whose ``is_entity`` table and ``mask_id`` are used.
    """
    if query not in QUERIES:
        raise InvalidArgumentError(f"query must be one of {QUERIES}, got {query!r}.")
    g = model.config.grid
    lut = torch.from_numpy(enc.is_entity).to(input_ids.device)
    entity = lut[input_ids] & (attention_mask > 0)
    ids = torch.where(entity, torch.full_like(input_ids, enc.mask_id), input_ids) if query == "masked" else input_ids
    with CrossAttention(model) as att:
        model.text(ids, attention_mask, torch.zeros_like(ids), image_tokens, image_tokens.mean(1, keepdim=True))
        probs = att.cross.float().amax(dim=1)  # [B, T, patches]
    maps = (probs * entity[..., None].to(probs.dtype)).sum(1).reshape(-1, g, g)
    return maps, entity.any(1)


def phantom_agreement(windows_csv: str | Path, phantom_root: str | Path) -> dict[str, float]:
    """How windows (a ``compute_windows`` CSV) match a phantom data set's truth (``ecamp.train.phantom``): ``side``,
    the share of films with one lateralised finding whose window lies on the finding's side (``label_j`` 2 for the
    patient's left, the image's right; 0 for the right; 1 is on neither side); ``exact``, the share equal to the
    phantom's window; ``best_constant``, the exact share of the most frequent true window (what one window for
    every film reaches)."""
    root = Path(phantom_root)
    truth = {r["img_path"]: (int(r["label_i"]), int(r["label_j"]))
             for r in read_table(root / "mimic-cxr-2.0.0-attn-label.csv", ["img_path", "label_i", "label_j"])}
    sides = {}
    for r in read_table(root / "labels.csv", ["img_path", "effusion_side", "nodule_side", "pneumothorax_side"]):
        found = {r[k] for k in ("effusion_side", "nodule_side", "pneumothorax_side")} - {""}
        if len(found) == 1:
            sides[r["img_path"]] = found.pop()
    rows = [r for r in read_table(windows_csv, ["img_path", "label_i", "label_j"]) if r["label_j"] != ""]
    if not rows:
        raise InvalidArgumentError(f"{windows_csv} holds no window.", path=windows_csv)
    got = {r["img_path"]: (int(r["label_i"]), int(r["label_j"])) for r in rows}
    lateral = [p for p in got if p in sides]
    on_side = [(got[p][1] > 1) if sides[p] == "left" else (got[p][1] < 1) for p in lateral]
    true = [truth[p] for p in got]
    return {"films": len(got), "side": float(np.mean(on_side)) if on_side else float("nan"),
            "exact": float(np.mean([got[p] == truth[p] for p in got])),
            "best_constant": max(true.count(t) for t in set(true)) / len(true)}


@torch.no_grad()
def compute_windows(stage1: str | Path, data_root: str | Path, out_csv: str | Path, *,
                    reports_csv: str = "mimic-cxr-2.0.0-entity-llm.csv", batch_size: int = 16,
                    device: str | None = None, method: str = "occlusion", query: str = "plain",
                    save_maps: str | Path | None = None, n_maps: int = 16, progress: bool = True
                    ) -> dict[str, int]:
    """Write ``img_path, label_i, label_j, source`` for every image of the reports CSV; returns counts.

    ``method`` and ``query`` as in the module docstring. ``save_maps``: a folder for PNG pictures of the first
    ``n_maps`` films (film, patch map, chosen window; the data's own windows and finding boxes when it has them).
    """
    from ecamp.console import progress_bar
    from ecamp.text import ReportEncoder

    if method not in METHODS:
        raise InvalidArgumentError(f"method must be one of {METHODS}, got {method!r}.")
    if query not in QUERIES:
        raise InvalidArgumentError(f"query must be one of {QUERIES}, got {query!r}.")
    if save_maps is not None:
        from ecamp.train.pretrain.sr_maps import MapWriter

        maps_out = MapWriter(save_maps, data_root, method=method)  # matplotlib checked before the long run
    model, tokenizer, data_cfg = load_stage1(stage1)
    from ecamp.distributed import select_device

    dev = select_device(device)
    model.to(dev)
    cfg = model.config
    enc = ReportEncoder(tokenizer, max_length=cfg.max_text_len)
    root = Path(data_root)
    rows = read_table(root / reports_csv, ["img_path", "report"], missing_hint=LAYOUT_HINT)
    size = cfg.sr_img_size
    results: list[list[Any]] = []
    counts = {"images": len(rows), "windows": 0, "no_entity": 0}
    for start in progress_bar(range(0, len(rows), batch_size), desc="sr-windows", unit="batch",
                              disable=not progress):
        chunk = rows[start:start + batch_size]
        images, ids, masks = [], [], []
        for r in chunk:
            # the pre-training reader (intensity policy, image_root, normalisation), without augmentation
            images.append(read_film(root / data_cfg.image_root / r["img_path"], data_cfg, size))
            t, m = enc.tokenize(r["report"])
            ids.append(torch.from_numpy(t))
            masks.append(torch.from_numpy(m))
        x = torch.stack(images).to(dev)
        found = score_windows(model, enc, x, torch.stack(ids).to(dev), torch.stack(masks).to(dev), method=method,
                              query=query)
        for b, (r, offset) in enumerate(zip(chunk, found.best(), strict=True)):
            if not found.has_target[b]:
                results.append([r["img_path"], "", "", "no-entity"])
                counts["no_entity"] += 1
                continue
            results.append([r["img_path"], *to_authors(offset, cfg.grid, cfg.sr_window), method])
            counts["windows"] += 1
            if save_maps is not None and start + b < n_maps:
                maps_out.write(r["img_path"], r["report"], x[b, 0].cpu(), found.maps[b].cpu().numpy(), offset,
                               cfg.grid, cfg.sr_window)
    write_csv(out_csv, ["img_path", "label_i", "label_j", "source"], results)
    return counts
