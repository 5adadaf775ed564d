"""Report encoding on the Indiana University reports: rule statistics, and time per report against a
straightforward per-token Python implementation of the same rules (tests/helpers/text_reference.py).

    pip install torchxrayvision        # ships the report texts; read in place, never copied
    python bench/text_pipeline.py

Both implementations get the same tokenised reports and the same random draws (they are checked to agree token by
token), so the timing compares only the masking and weighting work. Tokenisation time is printed separately.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ecamp.text import ReportEncoder, insert_context, train_tokenizer  # noqa: E402
from ecamp.text.report import mask_tokens, template_weights  # noqa: E402

from helpers.iu_reports import iu_reports  # noqa: E402
from helpers.text_reference import reference_mask, reference_weights  # noqa: E402


def main() -> None:
    reports = iu_reports()
    t0 = time.perf_counter()
    enc = ReportEncoder(train_tokenizer(reports, vocab_size=30000), max_length=256)
    print(f"{len(reports)} reports; tokenizer trained in {time.perf_counter() - t0:.1f} s "
          f"(vocabulary {enc.tokenizer.get_vocab_size()})")
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    tokenised = [enc.tokenize(insert_context(r, None, rng, enc.config.context_prob))[0] for r in reports]
    t_tok = (time.perf_counter() - t0) / len(reports)
    draws = [(rng.random(256), rng.random(256)) for _ in reports]
    vocab_tokens = {i: t for t, i in enc.tokenizer.get_vocab().items()}
    entities = set(enc.config.entities)

    t0 = time.perf_counter()
    ours = []
    for ids, (u1, u2) in zip(tokenised, draws, strict=True):
        masked, desc, ents = mask_tokens(ids, u1, u2, is_continuation=enc.is_continuation, is_entity=enc.is_entity,
                                         dot_id=enc.dot_id, mask_id=enc.mask_id, pad_id=enc.pad_id, cfg=enc.config)
        ours.append((masked, desc, ents, template_weights(ids, enc.templates, desc, 0.05)))
    t_ours = (time.perf_counter() - t0) / len(reports)

    t0 = time.perf_counter()
    refs = []
    for ids, (u1, u2) in zip(tokenised, draws, strict=True):
        masked, desc = reference_mask(ids, u1, u2, vocab_tokens=vocab_tokens, entities=entities, dot_id=enc.dot_id,
                                      mask_id=enc.mask_id, pad_id=enc.pad_id)
        refs.append((masked, desc, reference_weights(ids, desc, long_template=enc.templates[0],
                                                     short_template=enc.templates[1])))
    t_ref = (time.perf_counter() - t0) / len(reports)
    agree = all(o[0].tolist() == r[0] and o[1].tolist() == r[1] and np.allclose(o[3], r[2])
                for o, r in zip(ours, refs, strict=True))

    words = hit_words = ents_n = hit_ents = 0
    n_desc, sums = [], []
    for ids, (masked, desc, _, w) in zip(tokenised, ours, strict=True):
        length = int((ids != 0).sum())
        start = np.zeros(256, bool)
        start[1:min(length, 255)] = True
        start &= ~enc.is_continuation[ids]
        is_ent = enc.is_entity[ids] & start
        hit = masked == enc.mask_id
        words += (start & ~is_ent).sum()
        hit_words += (hit & start & ~is_ent).sum()
        ents_n += is_ent.sum()
        hit_ents += (hit & is_ent).sum()
        n_desc.append(desc.size)
        sums.append(w.sum())
    print(f"word-initial non-entity tokens masked: {hit_words / words:.3f} (rule: 0.70, or 0.75 without entities)")
    print(f"entity tokens masked:                  {hit_ents / ents_n:.3f} (rule: 0.75)")
    print(f"descriptors per report:                {np.mean(n_desc):.2f} (max {max(n_desc)})")
    print(f"weight sums:                           min {min(sums):.4f} max {max(sums):.4f} (rule: 256)")
    print(f"vectorised == per-token reference:     {agree}")
    print(f"tokenisation:                          {t_tok * 1e6:8.1f} us/report")
    print(f"masking + weights, ecamp (numpy):      {t_ours * 1e6:8.1f} us/report")
    print(f"masking + weights, per-token Python:   {t_ref * 1e6:8.1f} us/report")
    print(f"ratio (reference / ecamp):             {t_ref / t_ours:8.2f}")


if __name__ == "__main__":
    main()
