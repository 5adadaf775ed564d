"""Context-guided super-resolution windows (``ecamp sr-windows``): where the report's entities look in the image.

The authors' windows (``label_i, label_j``: the top-left cell of a 12x12 window on the 14x14 patch grid) came from
a script they did not publish. This is our reading of the method (dossier section 5): run a first-stage ECAMP model
with every patch visible, in grid order; feed the report (``[CLS]`` + report, no context) to the text side; take the
fusion layer's text-to-patch cross-attention probabilities at the report's entity tokens, the maximum over heads,
summed over the entity tokens; and pick the window with the largest total attention. Windows are searched only
among valid offsets, so a window outside the grid cannot occur. Reports without an entity get no window (empty
labels), and the pre-training data then uses ``data.default_window`` (the centre, or a random window drawn anew
every epoch).

``query`` chooses what the entity positions hold when the attention is read:

* ``"plain"`` (default): the report as written, the entity words themselves (the reading above);
* ``"masked"``: the entity tokens replaced by ``[MASK]``. In MLM training an entity must be predicted from the image
  exactly when it is masked, so this is where image-grounded attention should live; it is still the attention
  "from the report's entity tokens" (the same positions), only with the word hidden.

Measured on held-out phantoms (``ecamp.train.phantom``, findings at known places), neither query localises the
finding yet: windows point to the finding's side at chance (0.46-0.53, chance 0.5). With full phantom reports the
small first stages a CPU can train (the demo preset's 1,240 steps; 1,500 steps on effusion-only phantoms without
flips) do not use the image for the side words, although their encoder carries the side (a linear probe on its
tokens: 1.0): a masked "left"/"right" is predicted at chance with or without the image. With one-sentence reports a
first stage does read the side (75 % vs 51 % with a blank image), and single heads are then strongly lateralised,
but one attends to the finding and another to the opposite, normal lung (side AUROCs 0.85 and 0.0), so the maximum
over heads cancels out. The vertical separation of findings in the maps (effusion low, pneumothorax high) survives
pairing each report with another film: a prior of the entity word. These windows are therefore "where this model's
entity words attend"; their value depends on the first stage.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ecamp.errors import CheckpointError, InvalidArgumentError
from ecamp.fileio import write_csv
from ecamp.train.common.lists import LAYOUT_HINT, read_table
from ecamp.train.pretrain.config import DataConfig
from ecamp.train.pretrain.data import read_film
from ecamp.train.pretrain.windows import to_authors

# the reader settings an exported pre-training folder keeps (its ecamp block "data") for computing windows
_READER_FIELDS = ("image_policy", "image_root", "mean", "std")

__all__ = ["QUERIES", "best_window", "compute_windows", "entity_attention_maps", "load_stage1"]

QUERIES = ("plain", "masked")


def best_window(attention: np.ndarray, window: int) -> tuple[int, int]:
    """Top-left cell of the ``window`` x ``window`` square with the largest sum on a [g, g] map."""
    g = attention.shape[0]
    c = np.pad(attention, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    sums = c[window:, window:] - c[:-window, window:] - c[window:, :-window] + c[:-window, :-window]
    top, left = np.unravel_index(int(np.argmax(sums)), sums.shape)
    assert 0 <= top <= g - window and 0 <= left <= g - window
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
        saved = (model.ecamp_cfg or {}).get("data") or {}
        data = dataclasses.replace(DataConfig(), **{k: saved[k] for k in _READER_FIELDS if k in saved})
    else:
        model, run_cfg, ckpt = model_from_checkpoint(path)
        folder, data = ckpt.parent, run_cfg.data
    if not (folder / "tokenizer.json").is_file():
        raise CheckpointError(f"{folder} has no tokenizer.json; the first-stage model's tokenizer is needed.",
                              path=folder)
    return model.eval(), load_tokenizer(folder / "tokenizer.json"), data


@torch.no_grad()
def entity_attention_maps(model: Any, enc: Any, image_tokens: torch.Tensor, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor, *, query: str = "plain"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention maps ``[B, grid, grid]`` of the fusion layer from the entity tokens (max over heads, summed
    over the entity positions) and a ``[B]`` bool of which reports have an entity (others get an all-zero map).

    ``image_tokens`` are the projected patch tokens ``[B, grid*grid, text_hidden]`` in grid order (row-major);
    ``enc`` is the :class:`ecamp.text.ReportEncoder` whose ``is_entity`` table and ``mask_id`` are used.
    """
    if query not in QUERIES:
        raise InvalidArgumentError(f"query must be one of {QUERIES}, got {query!r}.")
    g = model.config.grid
    fusion = model.text.context_fusion_layer
    bert_config = model.text.bert_config
    previous = bert_config._attn_implementation
    bert_config._attn_implementation = "eager"  # only eager attention returns the probabilities
    fusion.keep_attention = True
    lut = torch.from_numpy(enc.is_entity).to(input_ids.device)
    entity = lut[input_ids] & (attention_mask > 0)
    ids = torch.where(entity, torch.full_like(input_ids, enc.mask_id), input_ids) if query == "masked" else input_ids
    try:
        model.text(ids, attention_mask, torch.zeros_like(ids), image_tokens, image_tokens.mean(1, keepdim=True))
        probs = fusion.last_cross_attention.float().amax(dim=1)  # [B, T, patches]
    finally:
        fusion.keep_attention = False
        fusion.last_cross_attention = None
        bert_config._attn_implementation = previous
    maps = (probs * entity[..., None].to(probs.dtype)).sum(1).reshape(-1, g, g)
    return maps, entity.any(1)


@torch.no_grad()
def compute_windows(stage1: str | Path, data_root: str | Path, out_csv: str | Path, *,
                    reports_csv: str = "mimic-cxr-2.0.0-entity-llm.csv", batch_size: int = 16,
                    device: str | None = None, query: str = "plain", progress: bool = True) -> dict[str, int]:
    """Write ``img_path, label_i, label_j, source`` for every image of the reports CSV; returns counts.

    ``query``: ``"plain"`` (the entity words) or ``"masked"`` (``[MASK]`` at the entity positions); module docstring.
    """
    from ecamp.console import progress_bar
    from ecamp.text import ReportEncoder

    if query not in QUERIES:
        raise InvalidArgumentError(f"query must be one of {QUERIES}, got {query!r}.")
    model, tokenizer, data_cfg = load_stage1(stage1)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)
    cfg = model.config
    enc = ReportEncoder(tokenizer, max_length=cfg.max_text_len)
    root = Path(data_root)
    rows = read_table(root / reports_csv, ["img_path", "report"], missing_hint=LAYOUT_HINT)
    size = cfg.sr_img_size
    results: list[list[Any]] = []
    counts = {"images": len(rows), "attention": 0, "no_entity": 0}
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
        small = F.interpolate(x, size=(cfg.img_size, cfg.img_size), mode="bicubic", align_corners=False)
        order = torch.arange(cfg.grid**2, dtype=torch.float32, device=dev).expand(x.shape[0], -1)
        latent, _, _, _ = model.forward_encoder(small, 0.0, order)  # all patches, in grid order
        tokens = model.bert_mlp(latent)[:, 1:]
        input_ids, attn = torch.stack(ids).to(dev), torch.stack(masks).to(dev)
        amaps, has_entity = entity_attention_maps(model, enc, tokens, input_ids, attn, query=query)
        for b, r in enumerate(chunk):
            if not has_entity[b]:
                results.append([r["img_path"], "", "", "no-entity"])
                counts["no_entity"] += 1
                continue
            amap = amaps[b].cpu().numpy()
            top, left = best_window(amap, cfg.sr_window)
            results.append([r["img_path"], *to_authors((top, left), cfg.grid, cfg.sr_window), "attention"])
            counts["attention"] += 1
    write_csv(out_csv, ["img_path", "label_i", "label_j", "source"], results)
    return counts
