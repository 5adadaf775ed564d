"""The text pipeline: tokenizer, context insertion, masking and weights, rule by rule and on real reports."""

from __future__ import annotations

import numpy as np
import pytest

from ecamp.text import MaskingConfig, ReportEncoder, ReportError, insert_context, train_tokenizer
from ecamp.text.report import mask_tokens, template_weights

from helpers.text_reference import reference_mask, reference_weights

CORPUS = [
    "there is no evidence of pneumothorax. mild cardiomegaly is present.",
    "there is no pleural effusion. the cardiomediastinal silhouette is normal.",
    "small left pleural effusion with adjacent atelectasis. no focal consolidation.",
    "copd with hyperexpanded lungs. calcified granuloma in the right upper lobe.",
    "moderate pulmonary edema. enlarged cardiac silhouette. there is no pneumothorax.",
    "unremarkable study. lungs are clear. heart size normal.",
] * 20


@pytest.fixture(scope="module")
def tokenizer():
    extra = ["hyperinflat hyperinfl unremarkably", "a nodule of 12 mm, stable."]
    return train_tokenizer(CORPUS + extra, vocab_size=400, min_frequency=1)


@pytest.fixture(scope="module")
def enc(tokenizer):
    return ReportEncoder(tokenizer, max_length=48)


def _tokens(enc, ids):
    vocab = {i: t for t, i in enc.tokenizer.get_vocab().items()}
    return [vocab[int(i)] for i in ids]


def test_tokenizer_specials_and_normalisation(tokenizer):
    assert [tokenizer.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[MASK]", "[SEP]")] == [0, 1, 2, 3, 4]
    out = tokenizer.encode("[CLS] Mild CARDIOMEGALY, 12 mm.")
    assert out.tokens[0] == "[CLS]" and "cardiomegaly" in out.tokens and "12" in out.tokens
    assert "[SEP]" not in out.tokens  # no post-processor: the authors never add [SEP]
    assert any(t.startswith("##") for t in tokenizer.encode("hyperinflated").tokens)


def test_insert_context_follows_the_authors():
    report = "a. b. c."
    seen = set()
    rng = np.random.default_rng(0)
    for _ in range(200):
        seen.add(insert_context(report, " CTX.", rng, prob=1.0))
    # 4 pieces ('a', ' b', ' c', '') -> 5 insertion points; '..' collapses once
    assert seen == {" CTX.a. b. c.", "a. CTX. b. c.", "a. b. CTX. c.", "a. b. c. CTX."}
    assert insert_context(report, " CTX.", rng, prob=0.0) == report
    assert insert_context("x...", None, rng, prob=0.0) == "x.."


def _run(enc, text, u_main, u_entity, cfg=None):
    ids, _ = enc.tokenize(text)
    cfg = cfg or enc.config
    masked, desc, ents = mask_tokens(ids, u_main, u_entity, is_continuation=enc.is_continuation,
                                     is_entity=enc.is_entity, dot_id=enc.dot_id, mask_id=enc.mask_id,
                                     pad_id=enc.pad_id, cfg=cfg)
    return ids, masked, desc, ents


def test_main_pass_skips_entities_and_masks_whole_words(enc):
    text = "small left pleural effusion with hyperinflated lungs."
    n = enc.max_length
    ids, masked, desc, ents = _run(enc, text, np.zeros(n), np.ones(n))
    toks, out = _tokens(enc, ids), _tokens(enc, masked)
    eff = toks.index("effusion")
    assert out[eff] == "effusion"  # entity: not masked in the main pass, and no entity pass (u_entity = 1)
    assert out[0] == "[CLS]"
    for i, t in enumerate(toks[1:], start=1):
        if t == "[PAD]":
            assert out[i] == "[PAD]"  # the scan stops at the first [PAD]
        elif i != eff:
            assert out[i] == "[MASK]", (i, t)  # every other token, continuations with their word
    assert list(desc) == [eff - 2, eff - 1]  # "left pleural"
    assert list(ents) == [eff]


def test_continuations_follow_only_the_first_pass(enc):
    text = "hyperinflated lungs. effusion."
    n = enc.max_length
    ids, masked, _, _ = _run(enc, text, np.ones(n), np.zeros(n))
    toks, out = _tokens(enc, ids), _tokens(enc, masked)
    hyp = [i for i, t in enumerate(toks) if t.startswith("##")]
    assert hyp and all(out[i] == toks[i] for i in hyp)  # nothing masked in the first pass
    assert out[toks.index("effusion")] == "[MASK]"  # the entity pass
    # and with the first pass masking the word start, its continuations follow
    u = np.ones(n)
    u[hyp[0] - 1] = 0.0
    _, masked2, _, _ = _run(enc, text, u, np.ones(n))
    out2 = _tokens(enc, masked2)
    assert all(out2[i] == "[MASK]" for i in [hyp[0] - 1, *hyp])


def test_descriptors_cross_sentence_boundaries_but_not_cls(enc):
    text = "cardiomegaly is present. pneumothorax is small."
    n = enc.max_length
    ids, _, desc, ents = _run(enc, text, np.ones(n), np.ones(n))
    toks = _tokens(enc, ids)
    assert toks[1] == "cardiomegaly" and 1 in ents
    pneu = toks.index("pneumothorax")
    # cardiomegaly at position 1: position 0 ([CLS]) stops the search; pneumothorax: '.' skipped, 'present' kept
    assert list(desc) == [pneu - 2] and toks[pneu - 2] == "present"


def test_no_entity_report_uses_the_higher_rate(enc):
    text = "unremarkable study. lungs are clear. heart size normal."
    n = enc.max_length
    u = np.full(n, 0.72)
    _, masked, _, ents = _run(enc, text, u, np.ones(n))
    assert ents.size == 0 and (masked == enc.mask_id).sum() > 5  # 0.72 < 0.75
    _, masked_e, _, _ = _run(enc, "unremarkable study. effusion.", u, np.ones(n))
    assert (masked_e == enc.mask_id).sum() == 0  # 0.72 >= 0.70 once an entity is present


def test_template_weights_worked_example(enc):
    text = "there is no evidence of pneumothorax. mild cardiomegaly is present. there is no pleural effusion."
    n = enc.max_length
    ids, _, desc, _ = _run(enc, text, np.ones(n), np.ones(n))
    toks = _tokens(enc, ids)
    assert toks[:19] == ["[CLS]", "there", "is", "no", "evidence", "of", "pneumothorax", ".", "mild", "cardiomegaly",
                         "is", "present", ".", "there", "is", "no", "pleural", "effusion", "."]
    assert list(desc) == [4, 5, 8, 15, 16]
    w = template_weights(ids, enc.templates, desc, 0.05)
    gamma = (0.95 * (8 - 3) + 5) / (5 - 0.95 * 3)
    assert gamma == pytest.approx(4.5349, abs=1e-4)
    expected = np.ones(n)
    expected[[1, 2, 3, 13, 14]] = 0.05
    expected[[4, 5, 15]] = 0.05 * gamma
    expected[[8, 16]] = gamma
    assert np.allclose(w, expected)
    assert w.sum() == pytest.approx(n)
    # templates without descriptors: the mass is spread over every position
    ids2, _, desc2, _ = _run(enc, "there is no change.", np.ones(n), np.ones(n))
    w2 = template_weights(ids2, enc.templates, desc2, 0.05)
    assert desc2.size == 0 and w2.sum() == pytest.approx(n) and w2[0] == pytest.approx(n / (n - 0.95 * 3))


def test_entity_case_and_forced_descriptors(tokenizer):
    text = "severe copd. small effusion."
    strict = ReportEncoder(tokenizer, max_length=32)
    loose = ReportEncoder(tokenizer, max_length=32, lowercase_entities=True)
    n = 32
    assert _run(strict, text, np.ones(n), np.ones(n))[3].size == 1  # only "effusion": "COPD" never matches
    assert _run(loose, text, np.ones(n), np.ones(n))[3].size == 2
    forced = ReportEncoder(tokenizer, max_length=32, force_mask_descriptors=True)
    ids, masked, desc, _ = _run(forced, text, np.ones(n), np.ones(n), forced.config)
    assert desc.size and all(masked[d] == forced.mask_id for d in desc)
    assert (masked == forced.mask_id).sum() == desc.size


def test_encoder_outputs_and_errors(enc):
    rng = np.random.default_rng(0)
    out = enc("small left pleural effusion.", "Effusion is fluid in the pleural space.", rng)
    assert set(out) == {"input_ids", "labels", "attention_mask", "token_type_ids", "weights"}
    assert all(v.shape == (48,) for v in out.values())
    assert out["weights"].dtype == np.float32 and out["input_ids"].dtype == np.int64
    assert out["weights"].sum() == pytest.approx(48, rel=1e-5)
    assert out["labels"][0] == 2 and (out["labels"] != -100).all()  # every position is a target (authors)
    masked_only = ReportEncoder(enc.tokenizer, max_length=48, labels_on_all_positions=False)
    o2 = masked_only("small left pleural effusion.", None, np.random.default_rng(1))
    assert ((o2["labels"] != -100) == (o2["input_ids"] == 3)).all()
    no_pad = ReportEncoder(enc.tokenizer, max_length=48, mlm_ignore_padding=True)
    o3 = no_pad("small left pleural effusion.", None, np.random.default_rng(1))
    assert ((o3["labels"] == -100) == (o3["attention_mask"] == 0)).all()
    for bad in ("", "   ", None, 3):
        with pytest.raises(ReportError):
            enc(bad, None, rng)
    with pytest.raises(ReportError):
        enc("effusion.", 5, rng)


def test_vectorised_equals_reference_on_random_draws(enc):
    vocab_tokens = {i: t for t, i in enc.tokenizer.get_vocab().items()}
    entities = {e for e in MaskingConfig().entities}
    rng = np.random.default_rng(42)
    for k in range(300):
        report = " ".join(rng.choice(CORPUS, size=3))
        ids, _ = enc.tokenize(insert_context(report, " copd is chronic lung disease.", rng))
        u1, u2 = rng.random(48), rng.random(48)
        masked, desc, _ = mask_tokens(ids, u1, u2, is_continuation=enc.is_continuation, is_entity=enc.is_entity,
                                      dot_id=enc.dot_id, mask_id=enc.mask_id, pad_id=enc.pad_id, cfg=enc.config)
        ref, ref_desc = reference_mask(ids, u1, u2, vocab_tokens=vocab_tokens, entities=entities,
                                       dot_id=enc.dot_id, mask_id=enc.mask_id, pad_id=enc.pad_id)
        assert masked.tolist() == ref and desc.tolist() == ref_desc, k
        w = template_weights(ids, enc.templates, desc, 0.05)
        assert np.allclose(w, reference_weights(ids, ref_desc, long_template=enc.templates[0],
                                                short_template=enc.templates[1]))
