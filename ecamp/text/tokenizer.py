"""WordPiece tokenizer with the authors' normaliser, pre-tokenizer and special tokens, trained deterministically."""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError, TokenizerError

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "load_tokenizer"]

# Ids 0-4, in this order, as in the authors' tokenizer.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[MASK]", "[SEP]")
PREFIX = "##"


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDependencyError("The text pipeline needs `tokenizers`: pip install \"ecamp[train]\".") from e
    return tokenizers


def _pipeline() -> Any:
    """An empty WordPiece tokenizer with the authors' normaliser and pre-tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=PREFIX,
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=False)])
    return tok


def _merge(ids: list[int], a: int, b: int, new: int) -> list[int]:
    """``ids`` with every occurrence of ``a b`` replaced by ``new``, left to right, non-overlapping."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _learn_vocab(word_counts: Counter, vocab_size: int, min_frequency: int, limit_alphabet: int | None) -> list[str]:
    """The vocabulary in id order (see :func:`train_tokenizer` for the rule)."""
    tokens: list[str] = list(SPECIAL_TOKENS)
    index = {t: i for i, t in enumerate(tokens)}

    def add(piece: str) -> int:
        if piece not in index:
            index[piece] = len(tokens)
            tokens.append(piece)
        return index[piece]

    char_freq: Counter = Counter()
    for word, n in word_counts.items():
        for ch in word:
            char_freq[ch] += n
    alphabet = sorted(char_freq, key=lambda ch: (-char_freq[ch], ch))
    if limit_alphabet is not None:
        alphabet = alphabet[:limit_alphabet]
    alphabet_set = set(alphabet)
    for ch in sorted(alphabet):
        add(ch)
    # a character outside the alphabet is dropped from its word; one not at the word's start continues it
    pieces = {w: [ch if i == 0 else PREFIX + ch for i, ch in enumerate(w) if ch in alphabet_set]
              for w in sorted(word_counts)}
    for piece in sorted({p for ps in pieces.values() for p in ps if p.startswith(PREFIX)}):
        add(piece)
    words = [[index[p] for p in ps] for ps in pieces.values()]
    counts = [word_counts[w] for w in pieces]

    pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, ids in enumerate(words):
        for pair in zip(ids, ids[1:], strict=False):
            pair_counts[pair] += counts[wi]
            where[pair].add(wi)
    # a max-heap on the count, then the smallest (id of the left part, id of the right part); stale entries (whose
    # count no longer matches) are skipped, since every change of a count pushes a fresh entry
    heap = [(-n, a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    threshold = max(min_frequency, 1)
    while len(tokens) < vocab_size and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_counts.get((a, b), 0) != -neg:
            continue
        if -neg < threshold:
            break
        right = tokens[b][len(PREFIX):] if tokens[b].startswith(PREFIX) else tokens[b]
        new = add(tokens[a] + right)
        changed = set()
        for wi in sorted(where.pop((a, b))):
            old = words[wi]
            merged = _merge(old, a, b, new)
            if len(merged) == len(old):
                continue  # an index left from before an earlier merge changed this word
            n = counts[wi]
            for pair in zip(old, old[1:], strict=False):
                pair_counts[pair] -= n
                changed.add(pair)
            for pair in zip(merged, merged[1:], strict=False):
                pair_counts[pair] += n
                where[pair].add(wi)
                changed.add(pair)
            words[wi] = merged
        for pair in sorted(changed):
            n = pair_counts[pair]
            if n > 0:
                heapq.heappush(heap, (-n, *pair))
            else:
                del pair_counts[pair]
                where.pop(pair, None)
    return tokens


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 30000, min_frequency: int = 2,
                    limit_alphabet: int | None = 1000) -> Any:
    """Train a WordPiece ``tokenizers.Tokenizer`` on report text; the same texts give the same JSON, byte for byte.

    Lower-case, NFKD and accent stripping; whitespace/punctuation then digit-run pre-tokenisation; ``##``
    continuation prefix; ``[PAD] [UNK] [CLS] [MASK] [SEP]`` as ids 0-4; no post-processor (the report encoder
    writes the leading ``[CLS]`` itself, and no ``[SEP]`` is ever added), as in the authors' ``mimic_wordpiece.json``.

    The vocabulary is learnt by the procedure of ``tokenizers``' ``WordPieceTrainer`` (which is BPE on
    ``##``-continued characters), from the same word counts, but with every tie broken by a fixed rule, where the
    library's Rust trainer breaks ties in hash-map order and so differs from process to process:

    - alphabet: the ``limit_alphabet`` most frequent characters (equal frequency: the smaller code point), given ids
      in code-point order after the special tokens; characters outside it are dropped from their words;
    - then every continuation piece ``##c`` of the alphabet that occurs, in code-point order;
    - then merges, one at a time: the adjacent pair with the largest count (summed over word frequencies) is
      merged in every word and the joined piece gets the next id (a piece made twice keeps its first id). Among
      pairs of equal count the one whose left part has the smallest id wins, then the smallest right part id
      (pieces made earlier go first);
    - training stops when the vocabulary holds ``vocab_size`` pieces or the best count is below ``min_frequency``.
      The special tokens, alphabet and continuation pieces are always kept, even beyond ``vocab_size``.
    """
    if vocab_size < 1 or min_frequency < 0 or (limit_alphabet is not None and limit_alphabet < 0):
        raise InvalidArgumentError(f"train_tokenizer needs vocab_size >= 1, min_frequency >= 0 and limit_alphabet >= "
                                   f"0 (or None); got {vocab_size}, {min_frequency}, {limit_alphabet}.")
    _tokenizers()  # a clear error if it is missing
    from tokenizers import AddedToken, models

    tok = _pipeline()
    normalizer, pre_tokenizer = tok.normalizer, tok.pre_tokenizer
    word_counts: Counter = Counter()
    for text in texts:
        if not isinstance(text, str):
            raise InvalidArgumentError(f"train_tokenizer needs strings; got {type(text).__name__} {text!r}.")
        word_counts.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    vocab = _learn_vocab(word_counts, vocab_size, min_frequency, limit_alphabet)
    tok.model = models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]",
                                 continuing_subword_prefix=PREFIX, max_input_chars_per_word=100)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise TokenizerError(f"Trained tokenizer put {t} at id {tok.token_to_id(t)}, expected {i}.")
    return tok


def load_tokenizer(source: str | os.PathLike | Any) -> Any:
    """A ``tokenizers.Tokenizer`` from a JSON file (e.g. the authors' ``mimic_wordpiece.json``) or an instance."""
    tk = _tokenizers()
    if isinstance(source, tk.Tokenizer):
        return source
    path = Path(source)
    if not path.is_file():
        raise InvalidArgumentError(f"Tokenizer file {path} does not exist.", path=path)
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 - tokenizers raises a generic Exception on bad JSON
        raise TokenizerError(f"{path} is not a tokenizers JSON file: {e}", path=path) from e
