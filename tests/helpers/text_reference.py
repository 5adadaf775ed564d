"""A straightforward per-token implementation of the authors' masking and weighting rules (dossier 4.4-4.5),
written as the dossier states them, with Python lists and membership tests. It exists to check the vectorised
``ecamp.text`` implementation token by token and as the baseline of ``bench/text_pipeline.py``."""

from __future__ import annotations


def reference_mask(ids, u_main, u_entity, *, vocab_tokens, entities, dot_id, mask_id, pad_id, p=0.70,
                   p_no_entity=0.75, p_entity=0.75, force_descriptors=False):
    ids = list(ids)
    length = len(ids)
    out = list(ids)
    entity_exist = any(vocab_tokens[t] in entities for t in ids[1:length - 1])
    entity_pos, mask_pos = [], []
    for i in range(1, length - 1):
        if ids[i] == pad_id:
            break
        tok = vocab_tokens[ids[i]]
        if tok.startswith("##"):
            if out[i - 1] == mask_id:
                out[i] = mask_id
            continue
        if tok in entities:
            entity_pos.append(i)
            for j in (1, 2):
                if i - j <= 0:
                    break
                if ids[i - j] != dot_id and (i - j) not in mask_pos:
                    mask_pos.append(i - j)
                    if force_descriptors:
                        out[i - j] = mask_id
        if entity_exist:
            if i not in entity_pos and i not in mask_pos and u_main[i] < p:
                out[i] = mask_id
        elif u_main[i] < p_no_entity:
            out[i] = mask_id
    for i in entity_pos:
        if u_entity[i] < p_entity:
            out[i] = mask_id
    return out, sorted(mask_pos)


def reference_weights(ids, descriptors, *, long_template, short_template, template_weight=0.05):
    length = len(ids)
    w = [1.0] * length
    d = []
    i = 0
    while i < length - 4:
        if list(ids[i:i + 5]) == list(long_template):
            for k in range(5):
                w[i + k] = template_weight
                d.append(i + k)
            i += 5
        elif list(ids[i:i + 3]) == list(short_template):
            for k in range(3):
                w[i + k] = template_weight
                d.append(i + k)
            i += 3
        else:
            i += 1
    n_d, n_m = len(d), len(descriptors)
    n_dm = len([x for x in descriptors if x in d])
    r = 1 - template_weight
    if n_m > 0 and n_d > 0:
        gamma = (r * (n_d - n_dm) + n_m) / (n_m - r * n_dm)
        for x in descriptors:
            w[x] *= gamma
    elif n_d > 0:
        w = [v * length / (length - r * n_d) for v in w]
    return w
