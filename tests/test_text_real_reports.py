"""The report encoder on 3,900+ real radiology reports: rates, descriptor counts and weight sums follow the rules."""

from __future__ import annotations

import numpy as np
import pytest

from ecamp.text import ReportEncoder, insert_context, train_tokenizer
from ecamp.text.report import mask_tokens, template_weights

from helpers.iu_reports import iu_reports
from helpers.text_reference import reference_mask, reference_weights


@pytest.fixture(scope="module")
def encoder():
    reports = iu_reports()
    assert len(reports) > 3900
    return ReportEncoder(train_tokenizer(reports, vocab_size=30000), max_length=256)


def test_rates_and_weights_on_iu_reports(encoder):
    enc = encoder
    vocab_tokens = {i: t for t, i in enc.tokenizer.get_vocab().items()}
    entities = set(enc.config.entities)
    rng = np.random.default_rng(0)
    eligible = masked_eligible = ent_total = ent_masked = no_ent_eligible = no_ent_masked = 0
    with_template = 0
    for report in iu_reports():
        ids, _ = enc.tokenize(insert_context(report, None, rng, enc.config.context_prob))
        u1, u2 = rng.random(256), rng.random(256)
        masked, desc, ents = mask_tokens(ids, u1, u2, is_continuation=enc.is_continuation, is_entity=enc.is_entity,
                                         dot_id=enc.dot_id, mask_id=enc.mask_id, pad_id=enc.pad_id, cfg=enc.config)
        ref, ref_desc = reference_mask(ids, u1, u2, vocab_tokens=vocab_tokens, entities=entities, dot_id=enc.dot_id,
                                       mask_id=enc.mask_id, pad_id=enc.pad_id)
        assert masked.tolist() == ref and desc.tolist() == ref_desc
        w = template_weights(ids, enc.templates, desc, 0.05)
        assert np.allclose(w, reference_weights(ids, ref_desc, long_template=enc.templates[0],
                                                short_template=enc.templates[1]))
        assert abs(w.sum() - 256) < 1e-6
        with_template += int((w < 0.06).any())
        length = int((ids != 0).sum())
        start = np.zeros(256, bool)
        start[1:min(length, 255)] = True
        start &= ~enc.is_continuation[ids]
        is_ent = enc.is_entity[ids] & start
        words = start & ~is_ent
        hit = masked == enc.mask_id
        if ents.size:
            eligible += words.sum()
            masked_eligible += (hit & words).sum()
            ent_total += is_ent.sum()
            ent_masked += (hit & is_ent).sum()
        else:
            no_ent_eligible += words.sum()
            no_ent_masked += (hit & words).sum()
    assert masked_eligible / eligible == pytest.approx(0.70, abs=0.01)
    assert ent_masked / ent_total == pytest.approx(0.75, abs=0.02)
    assert no_ent_masked / no_ent_eligible == pytest.approx(0.75, abs=0.01)
    assert ent_total > 1000 and with_template > 300


def test_encoder_output_on_real_reports(encoder):
    rng = np.random.default_rng(1)
    for report in iu_reports()[:200]:
        out = encoder(report, "Pleural effusion is fluid between the lung and the chest wall.", rng)
        assert abs(float(out["weights"].sum()) - 256) < 1e-3
        assert out["input_ids"][0] == 2 and (out["attention_mask"].sum() <= 256)
