"""Report text for ECAMP pre-training: WordPiece tokenizer, entities, context insertion, masking and weights."""

from .entities import ENTITIES, TEMPLATES
from .report import MaskingConfig, ReportEncoder, ReportError, insert_context
from .tokenizer import SPECIAL_TOKENS, load_tokenizer, train_tokenizer

__all__ = ["ENTITIES", "TEMPLATES", "MaskingConfig", "ReportEncoder", "ReportError", "insert_context",
           "SPECIAL_TOKENS", "load_tokenizer", "train_tokenizer"]
