"""Report encoding for ECAMP's masked language modelling (dossier sections 4.2, 4.4 and 4.5).

:class:`ReportEncoder` turns a report and its LLM context into ``input_ids`` (masked), ``labels``,
``attention_mask``, ``token_type_ids`` and loss ``weights``, by the authors' rules:

1. *Context insertion*: with probability 0.8 the context is inserted at a random '.'-boundary of the report
   (``'..'`` then collapses to ``'.'`` once); the text is prefixed with ``[CLS]``, tokenised, truncated and padded.
2. *Masking* over positions 1..L-2, stopping at the first ``[PAD]``: word-initial tokens are masked with p 0.70
   (0.75 when the report has no entity), entity tokens are skipped there and masked with p 0.75 in a second pass;
   ``##`` continuations follow their word's first token in the first pass only (so a word masked in the second
   pass keeps its continuations). The up to two tokens before each entity, skipping a '.', are its *descriptors*.
3. *Weights*: the templates "there is no evidence of" / "there is no" get weight 0.05; the loss mass removed is
   given to the descriptors through the factor
   ``gamma = (0.95 (n_d - n_dm) + n_m) / (n_m - 0.95 n_dm)`` (or spread over all positions when a report has no
   descriptor), so the weights always sum to L.

The work per report is vectorised with numpy (linear in L). Randomness comes only from the ``rng`` argument.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ..errors import ConfigError, InvalidArgumentError, ReportError, TokenizerError
from .entities import ENTITIES, TEMPLATES

__all__ = ["MaskingConfig", "ReportEncoder", "ReportError", "insert_context", "mask_tokens", "template_weights"]


@dataclass(frozen=True)
class MaskingConfig:
    """The authors' masking and weighting constants; the two booleans at the end are deliberate deviations.

    ``lowercase_entities``: match the entity list case-insensitively, so ``COPD`` counts (authors: it never does).
    ``force_mask_descriptors``: always mask descriptor tokens, the variant the authors' dead code points at
    (authors: descriptors are masked at the ordinary rate and only up-weighted).
    ``labels_on_all_positions``: the authors' MLM target is every position, padding included; False restricts the
    loss to masked positions (labels -100 elsewhere). ``mlm_ignore_padding`` drops only the padding positions.
    """

    mask_prob: float = 0.70
    mask_prob_no_entity: float = 0.75
    entity_mask_prob: float = 0.75
    context_prob: float = 0.8
    template_weight: float = 0.05
    num_descriptors: int = 2
    entities: tuple[str, ...] = ENTITIES
    templates: tuple[tuple[str, ...], ...] = TEMPLATES
    lowercase_entities: bool = False
    force_mask_descriptors: bool = False
    labels_on_all_positions: bool = True
    mlm_ignore_padding: bool = False


def insert_context(report: str, context: str | None, rng: np.random.Generator, prob: float = 0.8) -> str:
    """The authors' insertion: with probability ``prob`` put ``context`` verbatim at a random '.'-boundary."""
    if rng.random() < prob:
        pieces = report.split(".")
        loc = int(rng.integers(0, len(pieces) + 1))
        sent = "".join(p + "." for p in pieces[:loc]) + (context or "") + "".join(p + "." for p in pieces[loc:])
    else:
        sent = report
    return sent.replace("..", ".")


def mask_tokens(ids: np.ndarray, u_main: np.ndarray, u_entity: np.ndarray, *, is_continuation: np.ndarray,
                is_entity: np.ndarray, dot_id: int, mask_id: int, pad_id: int, cfg: MaskingConfig
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mask one tokenised report. ``u_main``/``u_entity`` are the uniform draws per position, ``is_continuation``
    and ``is_entity`` boolean look-up tables over the vocabulary. Returns (masked ids, descriptor positions,
    entity positions)."""
    length = ids.shape[0]
    pads = np.flatnonzero(ids[1:length - 1] == pad_id)
    end = 1 + int(pads[0]) if pads.size else length - 1  # scan positions 1 .. end-1
    active = np.zeros(length, dtype=bool)
    active[1:end] = True
    cont = is_continuation[ids] & active
    ent = is_entity[ids] & active
    entity_pos = np.flatnonzero(ent)
    prob = cfg.mask_prob if entity_pos.size else cfg.mask_prob_no_entity
    starts = active & ~cont
    first = starts & ~ent & (u_main < prob)
    # a continuation follows the first pass's decision for the token that starts its word
    idx = np.arange(length)
    head = np.maximum.accumulate(np.where(cont, 0, idx))
    masked = first | (cont & first[head])
    descriptors = []
    for j in range(1, cfg.num_descriptors + 1):
        pos = entity_pos - j
        # the authors stop at position 0 ([CLS]) and skip a '.' but keep looking past it
        keep = pos >= 1
        pos = pos[keep]
        descriptors.append(pos[ids[pos] != dot_id])
    desc = np.unique(np.concatenate(descriptors)) if descriptors else np.zeros(0, dtype=np.int64)
    if cfg.force_mask_descriptors:
        masked[desc] = True
    masked |= ent & (u_entity < cfg.entity_mask_prob)
    out = np.where(masked, mask_id, ids)
    return out, desc, entity_pos


def template_weights(ids: np.ndarray, templates: Sequence[np.ndarray], descriptors: np.ndarray,
                     template_weight: float) -> np.ndarray:
    """Loss weights: templates down-weighted, their mass moved to the descriptors; the weights sum to L."""
    length = ids.shape[0]
    w = np.ones(length, dtype=np.float64)
    in_template = np.zeros(length, dtype=bool)
    if templates:
        starts = np.flatnonzero(ids[: max(length - 4, 0)] == templates[0][0])
        nxt = 0
        for i in starts:  # greedy, non-overlapping, longest template first, as the authors scan
            if i < nxt:
                continue
            for tpl in templates:
                if np.array_equal(ids[i: i + len(tpl)], tpl):
                    in_template[i: i + len(tpl)] = True
                    nxt = i + len(tpl)
                    break
    w[in_template] = template_weight
    n_d = int(in_template.sum())
    n_m = int(descriptors.size)
    n_dm = int(in_template[descriptors].sum()) if n_m else 0
    r = 1.0 - template_weight
    if n_m and n_d:
        gamma = (r * (n_d - n_dm) + n_m) / (n_m - r * n_dm)
        w[descriptors] *= gamma
    elif n_d:
        w *= length / (length - r * n_d)
    return w


class ReportEncoder:
    """``enc(report, context, rng)`` -> dict of numpy arrays ``input_ids`` (masked), ``labels``,
    ``attention_mask``, ``token_type_ids`` (all int64, length ``max_length``) and ``weights`` (float32).

    ``tokenizer`` is a ``tokenizers.Tokenizer`` with ``[PAD] [UNK] [CLS] [MASK] [SEP]`` (see
    :func:`ecamp.text.train_tokenizer`); the template and '.' ids are looked up in it, never hard-coded.
    """

    def __init__(self, tokenizer: Any, max_length: int = 256, config: MaskingConfig | None = None,
                 **overrides: Any):
        from .tokenizer import load_tokenizer

        cfg = config or MaskingConfig()
        if overrides:
            cfg = replace(cfg, **overrides)
        self.config = cfg
        self.max_length = int(max_length)
        if self.max_length < 8:
            raise InvalidArgumentError(f"max_length must be at least 8, got {max_length}.")
        tok = load_tokenizer(tokenizer)
        # Configure truncation and padding once, on a private copy (the caller's tokenizer is left alone).
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tok.to_str())
        self.tokenizer.enable_truncation(self.max_length)
        self.tokenizer.enable_padding(length=self.max_length, pad_id=0, pad_token="[PAD]")
        vocab = self.tokenizer.get_vocab()
        ids = {t: self.tokenizer.token_to_id(t) for t in ("[PAD]", "[CLS]", "[MASK]", ".")}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"Tokenizer lacks {missing}; train it with ecamp.text.train_tokenizer.",
                                 path=tokenizer if isinstance(tokenizer, (str, os.PathLike)) else None)
        self.pad_id, self.cls_id, self.mask_id, self.dot_id = ids["[PAD]"], ids["[CLS]"], ids["[MASK]"], ids["."]
        size = self.tokenizer.get_vocab_size()
        self.is_continuation = np.zeros(size, dtype=bool)
        self.is_entity = np.zeros(size, dtype=bool)
        wanted = {e.lower() if cfg.lowercase_entities else e for e in cfg.entities}
        for token, i in vocab.items():
            if token.startswith("##"):
                self.is_continuation[i] = True
            if token in wanted:
                self.is_entity[i] = True
        self.templates = []
        for tpl in cfg.templates:
            tids = [self.tokenizer.token_to_id(t) for t in tpl]
            if None not in tids:
                self.templates.append(np.array(tids, dtype=np.int64))
        if len({t[0] for t in self.templates}) > 1:
            raise ConfigError("Templates must share their first token (the scan is keyed on it).")

    def tokenize(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        enc = self.tokenizer.encode("[CLS] " + text)
        return np.asarray(enc.ids, dtype=np.int64), np.asarray(enc.attention_mask, dtype=np.int64)

    def __call__(self, report: str, context: str | None, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if not isinstance(report, str) or not report.strip():
            raise ReportError(f"Report must be non-empty text, got {report!r:.80}.")
        if context is not None and not isinstance(context, str):
            raise ReportError(f"Context must be text or None, got {type(context).__name__}.")
        cfg = self.config
        text = insert_context(report, context, rng, cfg.context_prob)
        ids, attention = self.tokenize(text)
        u_main = rng.random(self.max_length)
        u_entity = rng.random(self.max_length)
        masked, desc, _ = mask_tokens(ids, u_main, u_entity, is_continuation=self.is_continuation,
                                      is_entity=self.is_entity, dot_id=self.dot_id, mask_id=self.mask_id,
                                      pad_id=self.pad_id, cfg=cfg)
        weights = template_weights(ids, self.templates, desc, cfg.template_weight)
        labels = ids.copy() if cfg.labels_on_all_positions else np.where(masked == self.mask_id, ids, -100)
        if cfg.mlm_ignore_padding:  # keep the loss on visible tokens (as the authors) but not on [PAD]
            labels[attention == 0] = -100
        return {"input_ids": masked, "labels": labels, "attention_mask": attention,
                "token_type_ids": np.zeros(self.max_length, dtype=np.int64),
                "weights": weights.astype(np.float32)}
