"""Exceptions raised by ecamp.

Every error derives from :class:`EcampError` and its message names the input that caused it and the next step to
take. Every class also derives from the matching builtin (``KeyError``, ``FileNotFoundError``, ``ValueError``...),
so code that catches the builtin keeps working; the base is never raised bare. Where an error is about a file or a
Hub repository it carries it as ``.path`` / ``.repo_id`` (``None`` otherwise), as ``huggingface_hub``'s errors do.
"""

from __future__ import annotations

__all__ = [
    "EcampError",
    "InvalidArgumentError",
    "ConfigError",
    "DataError",
    "BatchError",
    "ReportError",
    "DistillError",
    "CheckpointError",
    "TokenizerError",
    "UnknownModelError",
    "ManifestError",
    "WeightsNotPublishedError",
    "NotCachedError",
    "ChecksumMismatchError",
    "RepoNotFoundError",
    "RevisionNotFoundError",
    "RemoteFileNotFoundError",
    "HubConnectionError",
    "HubPermissionError",
    "DownloadError",
    "WeightsMismatchError",
    "MissingDependencyError",
    "NotAnEncoderError",
    "ModelFolderError",
    "InvalidWeightsFileError",
    "InvalidImageError",
    "ImageReadError",
    "MissingDecoderError",
]


class EcampError(Exception):
    """Base class of all ecamp errors (catch it to catch them all; raise one of the subclasses)."""

    def __init__(self, message: str = "", *, path: object = None, repo_id: str | None = None):
        super().__init__(message)
        self.path = None if path is None else str(path)
        self.repo_id = repo_id

    def __reduce__(self):  # keep .path / .repo_id through pickling (DataLoader workers, multiprocessing)
        return _rebuild, (type(self), str(self), self.path, self.repo_id)

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


def _rebuild(cls: type, message: str, path: str | None, repo_id: str | None) -> EcampError:
    return cls(message, path=path, repo_id=repo_id)


class InvalidArgumentError(EcampError, ValueError):
    """A function or command argument has an impossible value (the message names the argument and what fits)."""


class ConfigError(EcampError, ValueError):
    """A config file, preset or override is malformed: unknown key, wrong type, impossible value."""


class DataError(EcampError, ValueError):
    """A data set (list file, reports CSV, image folder) cannot be used as given."""


class BatchError(EcampError, ValueError):
    """A training batch has missing keys, wrong shapes or out-of-range values."""


class ReportError(EcampError, ValueError):
    """A report cannot be encoded (empty, or no entity where one is required)."""


class DistillError(EcampError, RuntimeError):
    """An LLM backend failed for a report after its retries, or answered outside the contract."""


class CheckpointError(EcampError, OSError):
    """A training checkpoint is missing, unreadable or of another format."""


class TokenizerError(EcampError, ValueError):
    """A tokenizer file cannot be parsed, or a tokenizer lacks the special tokens the report encoder needs."""


class UnknownModelError(EcampError, KeyError):
    """A model name is neither a manifest name, an alias, ``hf-hub:`` nor ``local-dir:``."""


class ManifestError(EcampError, ValueError):
    """The weights manifest (packaged or user-supplied) does not follow the schema."""


class WeightsNotPublishedError(EcampError, FileNotFoundError):
    """The manifest lists the model but its weights are not on the Hub yet."""


class NotCachedError(EcampError, FileNotFoundError):
    """Offline (or the Hub unreachable) and the file is not in the local cache."""


class ChecksumMismatchError(EcampError, OSError):
    """A downloaded file's sha256 differs from the manifest's (or from the one a converted folder records)."""


class RepoNotFoundError(EcampError, FileNotFoundError):
    """The Hub answered that the repository does not exist (or is private without a token)."""


class RevisionNotFoundError(EcampError, FileNotFoundError):
    """The Hub repository has no such branch, tag or commit."""


class RemoteFileNotFoundError(EcampError, FileNotFoundError):
    """The Hub repository exists at that revision but lacks a required file."""


class HubConnectionError(EcampError, ConnectionError):
    """The Hub could not be reached or answered with an unexpected error."""


class HubPermissionError(EcampError, PermissionError):
    """The Hub refused a write: no token, or a token without write access to the repo."""


class DownloadError(EcampError, ConnectionError):
    """A download from outside the Hub (the authors' release on Google Drive) failed, was cut off or delivered a web
    page instead of the file; ``.path`` is the URL."""


class WeightsMismatchError(EcampError, RuntimeError):
    """A state dict does not fit the model it is loaded into (missing, unexpected or mis-shaped keys)."""


class MissingDependencyError(EcampError, ImportError):
    """An optional dependency is needed for this feature; the message names the extra to install."""


class NotAnEncoderError(EcampError, ValueError):
    """The name refers to a full pre-training model, which ``ecamp.load`` (an image-encoder loader) does not build."""


class ModelFolderError(EcampError, FileNotFoundError):
    """A ``local-dir:`` folder (or a local-store folder) lacks ``config.json`` or ``model.safetensors``."""


class InvalidWeightsFileError(EcampError, ValueError):
    """A weights or config file cannot be parsed (truncated, not safetensors, not JSON)."""


class InvalidImageError(EcampError, ValueError):
    """An image (array, tensor, PIL image or file) cannot be used: wrong shape or dtype, NaN/inf, out of range."""


class ImageReadError(InvalidImageError):
    """A file or byte string cannot be decoded as an image (truncated, empty, not an image, no pixel data...)."""


class MissingDecoderError(ImageReadError, MissingDependencyError):
    """A compressed DICOM needs a pixel-data decoder plugin that is not installed."""
