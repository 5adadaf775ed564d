"""WordPiece tokenizer with the authors' normaliser, pre-tokenizer and special tokens, trained with ``tokenizers``."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InvalidArgumentError, MissingDependencyError, TokenizerError

__all__ = ["SPECIAL_TOKENS", "train_tokenizer", "load_tokenizer"]

# Ids 0-4, in this order, as in the authors' tokenizer.
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[MASK]", "[SEP]")


def _tokenizers():
    try:
        import tokenizers
    except ImportError as e:
        raise MissingDependencyError("The text pipeline needs `tokenizers`: pip install \"ecamp[train]\".") from e
    return tokenizers


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 30000, min_frequency: int = 2,
                    limit_alphabet: int = 1000) -> Any:
    """Train a WordPiece ``tokenizers.Tokenizer`` on report text.

    Lower-case, NFKD and accent stripping; whitespace/punctuation then digit-run pre-tokenisation; ``##``
    continuation prefix; ``[PAD] [UNK] [CLS] [MASK] [SEP]`` as ids 0-4; no post-processor (the report encoder
    writes the leading ``[CLS]`` itself, and no ``[SEP]`` is ever added), as in the authors' ``mimic_wordpiece.json``.
    """
    _tokenizers()  # a clear error if it is missing
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.Sequence([normalizers.Lowercase(), normalizers.NFKD(), normalizers.StripAccents()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Digits(individual_digits=False)])
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(SPECIAL_TOKENS), limit_alphabet=limit_alphabet,
                                        continuing_subword_prefix="##", show_progress=False)
    tok.train_from_iterator(texts, trainer)
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
