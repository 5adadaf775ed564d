"""Exceptions raised by ecamp.

Every error derives from :class:`EcampError` and its message names the input that caused it and the next step to
take. Every class also derives from the matching builtin (``KeyError``, ``FileNotFoundError``, ``ValueError``...),
so code that catches the builtin keeps working; the base is never raised bare. Where an error is about a file or a
Hub repository it carries it as ``.path`` / ``.repo_id`` (``None`` otherwise), as ``huggingface_hub``'s errors do.
"""

from __future__ import annotations

__all__ = [
    "EcampError",
    "ExportParityError",
    "RestrictedDataError",
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
    """Base class of all ecamp errors (catch it to catch them all; raise one of the subclasses).

    Never raised itself. Every subclass also derives from the matching builtin, and carries ``.path`` (the file,
    folder or URL it is about) and ``.repo_id`` (the Hub repo), ``None`` where they do not apply; both survive
    pickling, so errors raised in DataLoader workers arrive whole.
    """

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
    """A function or command argument has an impossible value (the message names the argument and what fits).

    Raised before any work starts: e.g. ``ecamp embed --shard 3/2``, a ``--target`` class a classifier does not
    have (``ecamp explain``), ``--mode linear-probe`` with a dense head, a non-positive batch size, an output file
    with the wrong suffix.

    What to do: change the argument as the message says.
    """


class ConfigError(EcampError, ValueError):
    """A config file, preset or override is malformed: unknown key, wrong type, impossible value.

    Raised by ``ecamp train pretrain`` / ``finetune`` when a YAML preset, a ``--config`` file or a ``key=value``
    override does not fit the run config (unknown key, wrong type, out of range: ``optim.lr=-1``); by
    :class:`ecamp.config.EcampCfg` for an unknown intensity policy, modality or task; and by the loader when a
    ``config.json`` names an architecture timm does not have or a head with impossible arguments.

    What to do: fix the key the message names (the keys: configuration reference); ``ecamp train presets`` lists
    the preset names.
    """


class DataError(EcampError, ValueError):
    """A data set (list file, reports CSV, image folder) cannot be used as given.

    Raised before the first training step when a list file is missing or empty, or names missing images,
    directories or bad labels (the message gives the list file, line and path of the first five problems and
    their count); during pre-training when more samples than ``data.max_bad_samples`` are unreadable; by
    ``ecamp embed`` when no input can be read and by ``ecamp embed merge`` when chunks are still missing.

    What to do: fix the files or paths the message names; ``ecamp train phantom`` writes an example of each
    layout.
    """


class BatchError(EcampError, ValueError):
    """A training batch has missing keys, wrong shapes or out-of-range values.

    Raised by :class:`ecamp.models.ECAMPPretrainModel` when a batch lacks one of ``image``, ``input_ids``,
    ``labels``, ``attention_mask``, ``token_type_ids``, ``weights``, ``sr_window``, when a tensor has the wrong
    shape, or when an SR window lies outside the patch grid.

    What to do: build batches with the pre-training data pipeline, or match the shapes the message gives.
    """


class ReportError(EcampError, ValueError):
    """A report cannot be encoded (empty, or no entity where one is required).

    Raised by :class:`ecamp.text.ReportEncoder` for an empty or non-text report, or a context that is not text.

    What to do: drop or fix the report; the pre-training data pipeline skips empty reports and counts them.
    """


class DistillError(EcampError, RuntimeError):
    """An LLM backend failed for a report after its retries, or answered outside the contract.

    Raised by ``ecamp train distill`` when the server refuses the credentials (401/403), answers 404 (wrong
    ``--base-url`` or model) or another non-retryable status, when a reports CSV row has no ``study_id``, or for a
    modality without a prompt.

    What to do: check ``--base-url`` (it ends in ``/v1``), ``--model`` and the key in ``--api-key-env``; a
    re-run continues where the last one stopped.
    """


class CheckpointError(EcampError, OSError):
    """A training checkpoint is missing, unreadable or of another format.

    Raised by ``ecamp train export``, ``--resume`` / ``--resume-from`` and ``ecamp train sr-windows`` when a run
    folder holds no ``checkpoint-*.pt``, a file is not an ecamp training checkpoint (the authors' ``.pth`` files
    go through ``ecamp convert``) or a first-stage folder lacks its ``tokenizer.json``.

    What to do: point at a run folder or checkpoint file that ecamp's training wrote.
    """


class TokenizerError(EcampError, ValueError):
    """A tokenizer file cannot be parsed, or a tokenizer lacks the special tokens the report encoder needs.

    Raised when ``data.tokenizer`` (or ``--tokenizer``) is not a tokenizers JSON file, or lacks ``[PAD]``,
    ``[CLS]``, ``[MASK]`` or ``.``.

    What to do: give the authors' ``mimic_wordpiece.json``, or train one with :func:`ecamp.text.train_tokenizer`
    (``data.tokenizer: null`` does that for a run).
    """


class UnknownModelError(EcampError, KeyError):
    """A model name is neither a manifest name, an alias, ``hf-hub:`` nor ``local-dir:``.

    Raised by ``ecamp.load``, ``ecamp.get_pretrained_cfg``, ``ecamp.download`` and every command taking
    ``--model``; the message lists close matches and the known names.

    What to do: use a name from ``ecamp list``, ``hf-hub:org/repo[@revision]`` or ``local-dir:/path``.
    """


class ManifestError(EcampError, ValueError):
    """The weights manifest (packaged or user-supplied) does not follow the schema.

    Raised when the manifest of ``ECAMP_MANIFEST`` / ``manifest=`` has an unknown field, a wrong type or a missing
    value (the message names the entry and field), when ``ecamp verify`` finds a manifest without models, and
    when ``ecamp push --manifest-out`` names a file that is not a manifest.

    What to do: fix the field (schema: the manifest page), or name a new file for ``--manifest-out``.
    """


class WeightsNotPublishedError(EcampError, FileNotFoundError):
    """The manifest lists the model but its weights are not on the Hub yet.

    Raised by ``ecamp.load("cxr-vit-b")`` (and the other registry names) while no ECAMP weights are published
    and the local store holds no converted copy. The message names the authors' original file and the planned
    repo.

    What to do: ``ecamp convert --from-authors cxr-vit-b`` (or ``ecamp convert ECAMP_ViT_Base_16.pth --name
    cxr-vit-b``) once; the name then loads offline from the local store.
    """


class NotCachedError(EcampError, FileNotFoundError):
    """Offline (or the Hub unreachable) and the file is not in the local cache.

    Raised under ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` when a file of the model has never been
    downloaded into the cache in use.

    What to do: run the command the message gives (``ecamp download NAME``) once while online, or point
    ``HF_HOME`` / ``cache_dir=`` at the cache that holds it.
    """


class ChecksumMismatchError(EcampError, OSError):
    """A downloaded file's sha256 differs from the manifest's (or from the one a converted folder records).

    Raised by ``ecamp.load`` / ``ecamp download`` before anything is loaded when a cached file is corrupt or was
    changed, when the manifest records no sha256 for a file, and by ``ecamp push`` when a file changed during the
    upload (nothing is recorded then). ``ecamp verify`` reports the same check without raising.

    What to do: ``ecamp download NAME --force`` re-fetches the file; for a push, push again once the folder is
    final.
    """


class RepoNotFoundError(EcampError, FileNotFoundError):
    """The Hub answered that the repository does not exist (or is private without a token).

    Raised for ``hf-hub:`` names that are not ``org/name``, for repos the Hub does not know or that are gated,
    and by ``ecamp push`` when the token cannot see the repo.

    What to do: check the repo id; for private or gated repos log in (``hf auth login`` or ``HF_TOKEN``) and
    accept the repo's terms.
    """


class RevisionNotFoundError(EcampError, FileNotFoundError):
    """The Hub repository has no such branch, tag or commit.

    Raised for ``hf-hub:org/repo@REV`` or ``revision=`` values the repo lacks, and by ``ecamp push`` for a branch
    that does not exist.

    What to do: use an existing revision, or omit it for the pinned (manifest) or default one.
    """


class RemoteFileNotFoundError(EcampError, FileNotFoundError):
    """The Hub repository exists at that revision but lacks a required file.

    Raised when a repo has no ``config.json`` or ``model.safetensors``: it is not a timm-format ecamp repo.

    What to do: load a repo written by ``ecamp push`` / ``ecamp.save_pretrained`` (or timm's
    ``push_to_hf_hub``).
    """


class HubConnectionError(EcampError, ConnectionError):
    """The Hub could not be reached or answered with an unexpected error.

    Raised on downloads and on ``ecamp push`` for network failures and unexpected HTTP errors (a push records
    nothing then).

    What to do: retry, set ``HF_ENDPOINT`` to a mirror, or work offline from the cache (``HF_HUB_OFFLINE=1``).
    """


class HubPermissionError(EcampError, PermissionError):
    """The Hub refused a write: no token, or a token without write access to the repo.

    Raised by ``ecamp push``; nothing is recorded in the manifest.

    What to do: ``hf auth login`` (or ``HF_TOKEN``, or ``--token``) with a token that can write to the repo.
    """


class DownloadError(EcampError, ConnectionError):
    """A download from outside the Hub (the authors' release on Google Drive) failed, was cut off or delivered a web
    page instead of the file; ``.path`` is the URL.

    Raised by ``ecamp convert --from-authors``: the partial download is deleted and the local store is left as
    it was.

    What to do: retry later (Drive's quota page is the usual cause), or download the file yourself and run
    ``ecamp convert FILE --name NAME``.
    """


class WeightsMismatchError(EcampError, RuntimeError):
    """A state dict does not fit the model it is loaded into (missing, unexpected or mis-shaped keys).

    Raised by ``ecamp.load`` (every key must match, except a replaced classifier head and, with
    ``fc_norm=True``, the final norm), by ``ecamp convert`` for checkpoints without ViT encoder keys or of other
    sizes, by the pre-training model's loaders, and by ``run.init_from`` weights without matching encoder keys.
    The message lists the keys.

    What to do: load weights into the architecture they were saved from; for other sizes give their config
    (``ecamp convert --config``).
    """


class MissingDependencyError(EcampError, ImportError):
    """An optional dependency is needed for this feature; the message names the extra to install.

    Raised on first use of a feature whose package is missing: training and the full pre-training model
    (``ecamp[train]``: transformers, tokenizers, PyYAML, scikit-learn, torchmetrics, openai), plots and Grad-CAM
    (``ecamp[plot]``), ``ecamp convert --from-authors`` (``ecamp[authors]``), ``ecamp export`` (``ecamp[onnx]``),
    Parquet output (``ecamp[parquet]``), ``run.log=tensorboard`` (tensorboard).

    What to do: ``pip install "ecamp[EXTRA]"`` with the extra the message names.
    """


class NotAnEncoderError(EcampError, ValueError):
    """The name refers to a full pre-training model, which ``ecamp.load`` (an image-encoder loader) does not build.

    Also raised the other way round, by ``ecamp.load_pretrain`` given an encoder.

    What to do: ``ecamp.load_pretrain(NAME)`` for a ``*-pretrain`` name, or the matching encoder name
    (``ecamp list``) for features and fine-tuning.
    """


class ModelFolderError(EcampError, FileNotFoundError):
    """A ``local-dir:`` folder (or a local-store folder) lacks ``config.json`` or ``model.safetensors``.

    Raised by ``ecamp.load`` for incomplete folders, and by ``ecamp push`` for a path that is not a folder or a
    folder holding symbolic links or hidden/temporary files.

    What to do: point at a folder written by ``ecamp.save_pretrained``, ``ecamp train export`` or ``ecamp
    convert --out``; for a push, remove what the message names.
    """


class InvalidWeightsFileError(EcampError, ValueError):
    """A weights or config file cannot be parsed (truncated, not safetensors, not JSON).

    Raised by the loaders for a ``model.safetensors`` that is not readable safetensors, and a ``config.json``
    that is not JSON, lacks ``architecture`` or describes a fine-tuned dense model without its ``encoder`` block.

    What to do: re-fetch (``ecamp download NAME --force``) or re-export the folder.
    """


class InvalidImageError(EcampError, ValueError):
    """An image (array, tensor, PIL image or file) cannot be used: wrong shape or dtype, NaN/inf, out of range.

    Raised by ``ecamp.get_transform(...)`` transforms and ``ecamp.io.read_image`` for in-memory images with NaN
    or infinite values, float values outside [0, 1], shapes other than ``[H, W]``, ``[H, W, 1]``, ``[H, W, 3]``
    (or channel-first) and unsupported dtypes; for files, a multi-frame DICOM or multi-page TIFF without
    ``frame=`` (or a frame it lacks), an unknown intensity policy, or ``policy="voi"`` on a file without a VOI LUT
    or window. ``.path`` names the file when there is one.

    What to do: convert the array as the message says; batch tools (``ecamp embed``, ``ecamp predict``) skip
    such inputs and list them.
    """


class ImageReadError(InvalidImageError):
    """A file or byte string cannot be decoded as an image (truncated, empty, not an image, no pixel data...).

    Raised by ``ecamp.io.read_image`` (and so by every transform, ``ecamp embed`` and ``ecamp predict``, which
    record it per file) for empty or truncated files, non-images, DICOM without pixel data, directories, FIFOs
    and other non-regular files (never opened), and images over the pixel limit (``ECAMP_MAX_IMAGE_PIXELS``,
    default 2^27, a guard against decompression bombs).

    What to do: check the file the message names; a batch run carries on without it.
    """


class MissingDecoderError(ImageReadError, MissingDependencyError):
    """A compressed DICOM needs a pixel-data decoder plugin that is not installed.

    Raised by ``ecamp.io.read_image`` for JPEG, JPEG-LS, JPEG 2000 or RLE transfer syntaxes without a decoder;
    the message names the file and the transfer syntax.

    What to do: ``pip install "ecamp[dicom]"`` (pylibjpeg, pylibjpeg-openjpeg, pyjpegls).
    """


class ExportParityError(EcampError, RuntimeError):
    """An exported graph's outputs differ from the torch model's by more than the tolerance.

    Raised by :func:`ecamp.export.export` (``ecamp export``) after running the graph (ONNX Runtime or the
    reloaded TorchScript module) and the torch model on the same tensors; nothing is written then.

    What to do: report it with the model kind, ``--format`` and ``--opset``; another opset or the other format
    may export it faithfully.
    """


class RestrictedDataError(EcampError, PermissionError):
    """What would be shared is bound by a data-use licence that forbids sharing it openly.

    Raised by ``ecamp push`` for a public push of a folder holding a text side trained on credentialed reports
    (the full pre-training model and its tokenizer: MIMIC-CXR's and FFA-IR's reports are under the PhysioNet
    Credentialed Health Data License), and by ``ecamp train distill`` for an LLM endpoint that is neither on
    this machine nor on a private network (that licence forbids sending the reports to third-party services).
    Nothing is sent in either case; the message names the licence.

    What to do: push with ``--gated manual`` (or ``auto``) or ``--private``, or push the image encoder instead;
    for distillation, use a local server, or pass ``--allow-remote-llm`` when the service is covered by the
    licence (``--reports-not-credentialed`` for reports that are not credentialed).
    """
