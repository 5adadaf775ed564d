"""The downstream protocol: every choice where ecamp's fine-tuning can differ from the authors' ``Fine-tuning/*``
code, as one named option each (docs/fidelity.md, "Downstream", has the table with the authors' file:line).

``Protocol()`` is ecamp's default: the fixed behaviour, or the authors' where their choice is right.
:func:`authors_protocol` gives the authors' behaviour for every item (``--authors-protocol``), bugs included on
purpose. ``ecamp train finetune --protocol-option NAME=VALUE`` changes one item on top of either; ``metrics.json``
records the resolved set under ``protocol_options``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ecamp.errors import InvalidArgumentError
from ecamp.schema import update

__all__ = ["Protocol", "authors_protocol", "resolve_protocol", "parse_protocol_options"]


@dataclass(frozen=True)
class Protocol:
    # -- the loop, every head -------------------------------------------------------------------------------------
    drop_last: bool = False  # D1: keep the last, partial batch of each epoch (the authors'; also ecamp's default)
    save_on_tie: bool = True  # D2: a validation score equal to the best replaces the checkpoint
    start_eval_strict: bool = True  # D11: first validation after step > start_eval (the authors' ``>``)
    # #36: the authors' learning rates: their schedule stepped before the optimizer, so step k runs at their
    # factor(k) (k / warmup, then the cosine at k); ecamp's runs k / warmup, then the cosine at k - 1
    scheduler_before_optimizer: bool = False
    best_starts_at_zero: bool = False  # D14: the best score starts at 0, not -inf (a first score of 0 may not save)
    precision: str | None = field(default=None, metadata={"choices": (None, "fp32", "bf16", "fp16")})  # D13
    # -- classification -------------------------------------------------------------------------------------------
    # D12: "true-probe" (frozen trunk in eval mode), "authors" (their --mode LinearProbe: only head.* trains, the
    # trunk keeps drop-path 0.1 and train mode, a fresh frozen fc_norm, head std 2e-5), "full-finetune" (what
    # their run_lp.sh ran: it never passes --mode LinearProbe)
    lp_head: str = field(default="true-probe", metadata={"choices": ("true-probe", "authors", "full-finetune")})
    select_on_test: bool = False  # #40: where val_list equals test_list, select on it anyway
    # D15: a class whose validation or test labels are all alike: left out of the mean AUROC ("skip"), or the run
    # refused before training ("stop": the authors' roc_auc_score raises, or its NaN mean saves nothing)
    auroc_undefined_class: str = field(default="skip", metadata={"choices": ("skip", "stop")})
    # D16: AUROC of the logits, or of their float32 sigmoid (which ties logits closer than about 2.4e-7 near 0)
    auroc_scores: str = field(default="logits", metadata={"choices": ("logits", "sigmoid-fp32")})
    # -- segmentation and detection -------------------------------------------------------------------------------
    # D3: dense heads read the tokens after the encoder's final LayerNorm, or the raw block-12 tokens
    dense_tokens: str = field(default="final-norm", metadata={"choices": ("final-norm", "raw-block")})
    # D6: antialiased resize of the full-depth float image, or cv2 INTER_LINEAR of the 8-bit image (no antialias)
    resize: str = field(default="antialias-float", metadata={"choices": ("antialias-float", "linear-uint8")})
    # -- segmentation ---------------------------------------------------------------------------------------------
    siim_balance_negatives: bool = False  # D4: train on the positives plus as many seeded random negatives
    siim_augment_mask: bool = True  # #44: the authors augmented the SIIM image alone
    affine_p: float = 0.5  # D5: probability of the training affine (rotate +-10 deg, scale 0.9-1.1)
    image_interpolation: str = field(default="bilinear", metadata={"choices": ("bilinear", "nearest")})  # D5
    riga_rgb: bool = False  # D7: RIGA images in colour (each channel normalised) instead of grey
    riga_loss: str = field(default="mean-of-two", metadata={"choices": ("mean-of-two", "pooled")})  # D8
    # -- detection ------------------------------------------------------------------------------------------------
    yolo_class_loss_over: str = field(default="positives", metadata={"choices": ("positives", "all")})  # D9
    nms_iou_plus_one: bool = False  # D10: the authors' NMS (+1-pixel IoU, suppress IoU >= threshold)
    det_test_split: str = field(default="test", metadata={"choices": ("test", "val")})  # #41
    map_skip_empty: bool = False  # #42: score only images with a box and a prediction

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def recipe(self, recipe: Any) -> Any:
        """``recipe`` with this protocol's precision, where it sets one."""
        return recipe if self.precision is None else recipe.replace(precision=self.precision)


def authors_protocol(metric: str = "auroc") -> Protocol:
    """The authors' behaviour for every item. ``metric``: the task's validation metric, since their
    classification code saves on ties for AUROC but not for accuracy (``train.py:484`` vs ``:492``)."""
    return Protocol(drop_last=False, save_on_tie=metric != "accuracy", start_eval_strict=True,
                    scheduler_before_optimizer=True, best_starts_at_zero=True, precision="fp16", lp_head="authors",
                    select_on_test=True, auroc_undefined_class="stop", auroc_scores="sigmoid-fp32",
                    dense_tokens="raw-block", resize="linear-uint8", siim_balance_negatives=True,
                    siim_augment_mask=False, affine_p=0.5, image_interpolation="bilinear", riga_rgb=True,
                    riga_loss="mean-of-two", yolo_class_loss_over="all", nms_iou_plus_one=True, det_test_split="val",
                    map_skip_empty=True)


def resolve_protocol(protocol: Protocol | Mapping[str, Any] | None, authors: bool, metric: str = "auroc"
                     ) -> Protocol:
    """A :class:`Protocol` as given, or the base (``authors``: the authors', else ecamp's) with the options of a
    mapping applied."""
    if isinstance(protocol, Protocol):
        return protocol
    base = authors_protocol(metric) if authors else Protocol()
    if not protocol:
        return base
    out = update(base, dict(protocol), error=InvalidArgumentError, source="--protocol-option", noun="option")
    if not 0.0 <= out.affine_p <= 1.0:
        raise InvalidArgumentError(f"--protocol-option affine_p must be in [0, 1], got {out.affine_p}.")
    return out


def parse_protocol_options(items: Sequence[str]) -> dict[str, Any]:
    """``NAME=VALUE`` strings (values read as YAML: true, 0.5, raw-block) -> {name: value}."""
    from ecamp.errors import ConfigError
    from ecamp.schema import load_yaml

    options: dict[str, Any] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip():
            raise InvalidArgumentError(f"--protocol-option {item!r} must look like NAME=VALUE, e.g. drop_last=true.")
        try:
            options[name.strip()] = load_yaml(raw, source=f"--protocol-option {item[:80]!r}")
        except ConfigError as e:
            raise InvalidArgumentError(str(e)) from e
    return options
