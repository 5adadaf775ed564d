"""The authors' pre-training checkpoints (``ECAMP_ViT_Base_16.pth``) -> ecamp folders.

An image encoder is converted from the checkpoint's ViT keys alone (no BERT is built, so ``transformers`` is not
needed); a full pre-training model (``*-pretrain`` names) goes through :class:`ECAMPPretrainModel`. Both the
``ecamp convert`` command and ``ecamp train export`` write encoders through :func:`export_encoder`.
:func:`convert_from_authors` downloads the release the manifest links (Google Drive, through ``gdown``) first.

A converted folder records the sha256 of the checkpoint it came from in ``config.json``
(``ecamp.provenance.original_sha256``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import EcampCfg, ecamp_cfg_of
from .errors import (
    ChecksumMismatchError,
    ConfigError,
    DownloadError,
    InvalidArgumentError,
    InvalidWeightsFileError,
    MissingDependencyError,
    WeightsMismatchError,
)
from .fileio import sha256_file
from .models.pretrain import ENCODER_KEYS, ECAMPPretrainConfig, encoder_config, read_authors_checkpoint
from .registry import ManifestLike, ModelEntry, load_manifest

__all__ = ["read_authors_checkpoint", "read_checkpoint", "encoder_from_authors", "encoder_cfgs", "encoder_for",
           "export_encoder", "convert", "convert_from_authors"]

PathLike = str | os.PathLike


def encoder_cfgs(entry: ModelEntry, img_size: int, in_chans: int = 3) -> tuple[dict[str, Any], EcampCfg]:
    """The ``pretrained_cfg`` and ``ecamp`` block an exported encoder of ``entry`` carries (input size from the
    weights: a non-default ``img_size`` keeps its own)."""
    pcfg = {k: v for k, v in entry.pretrained_cfg.items() if k != "hf_hub_id"}
    pcfg["input_size"] = [in_chans, img_size, img_size]
    return pcfg, EcampCfg.from_dict(entry.ecamp)


def encoder_from_authors(checkpoint: PathLike | Mapping[str, torch.Tensor], *, pretrained_cfg: Mapping[str, Any],
                         ecamp_cfg: EcampCfg | Mapping[str, Any], config: ECAMPPretrainConfig | None = None,
                         source: str | None = None) -> nn.Module:
    """The image encoder of an authors'-format checkpoint: its ViT keys loaded strictly into a timm
    ``VisionTransformer`` (trainable position embedding, mean-pooled after the final norm); ``source`` names a
    state dict in messages."""
    from .models.encoder import build_encoder

    cfg = config or ECAMPPretrainConfig()
    source = str(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else source or "state dict"
    state = read_authors_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else dict(checkpoint)
    vit = {k: v for k, v in state.items() if ENCODER_KEYS.match(k)}
    if not any(k.startswith("blocks.") for k in vit):
        raise WeightsMismatchError(f"{source} holds no ViT encoder keys (patch_embed, blocks.*, norm); it is not an "
                                   f"ECAMP pre-training checkpoint.", path=None if source == "state dict" else source)
    encoder = build_encoder(encoder_config(cfg, pretrained_cfg))
    target = encoder.state_dict()
    missing, unexpected = sorted(set(target) - set(vit)), sorted(set(vit) - set(target))
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in vit.items()
              if k in target and v.shape != target[k].shape]
    if missing or unexpected or shapes:
        raise WeightsMismatchError(f"{source} does not fit a ViT with {cfg.embed_dim}-d, {cfg.depth} blocks, "
                                   f"{cfg.img_size}-px input: missing {missing[:6]}, unexpected {unexpected[:6]}, "
                                   f"mis-shaped {shapes[:4]}. Pass --config with the checkpoint's sizes.")
    encoder.load_state_dict(vit, strict=True)
    encoder.ecamp_cfg = EcampCfg.from_dict(ecamp_cfg)
    return encoder.eval()


def encoder_for(model: Any, name: str, manifest: ManifestLike = None) -> nn.Module:
    """The stand-alone encoder of an :class:`ECAMPPretrainModel`, carrying manifest entry ``name``'s preprocessing
    cfg (``name`` must be an image encoder, e.g. ``cxr-vit-b``)."""
    entry = load_manifest(manifest).resolve(name)
    if entry.kind != "encoder":
        raise InvalidArgumentError(f"--name must name an image encoder (e.g. cxr-vit-b), got {name} ({entry.kind}).")
    pcfg, block = encoder_cfgs(entry, model.config.img_size, model.config.in_chans)
    return model.to_encoder(pcfg, block)


def export_encoder(encoder: nn.Module, entry: ModelEntry, out: PathLike, *, provenance: Mapping[str, Any],
                   hf_repo: str | None = None) -> dict[str, Any]:
    """Write ``encoder`` as the timm-format folder of ``entry`` with its provenance; returns the manifest entry."""
    from .folders import save_pretrained

    encoder.ecamp_cfg = ecamp_cfg_of(encoder).replace(provenance=dict(provenance))
    return save_pretrained(encoder, out, name=entry.name, hf_repo=hf_repo or entry.hf_repo)


# A checkpoint's tensors are stored uncompressed by torch.save: members that inflate by more than this (or to more
# than ECAMP_MAX_CHECKPOINT_GB in all) are a zip bomb, refused before torch.load inflates them
_MAX_INFLATE_RATIO = 20
_MAX_CHECKPOINT_GB = 16
_MAX_CONFIG_BYTES = 1 << 20  # a --config of sizes is a few hundred bytes


def read_checkpoint(path: PathLike) -> dict[str, torch.Tensor]:
    """:func:`read_authors_checkpoint` behind a guard against zip bombs, its refusal of pickled objects worded for
    an untrusted file (torch's own message advises ``weights_only=False``, which would run the pickle)."""
    import zipfile

    from .schema import max_bound

    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                members = z.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            raise InvalidWeightsFileError(f"{path} is not a readable PyTorch checkpoint ({e}).", path=path) from e
        total, limit = sum(m.file_size for m in members), max_bound("CHECKPOINT_GB", _MAX_CHECKPOINT_GB) * 1e9
        packed = [m for m in members if m.compress_type != zipfile.ZIP_STORED
                  and m.file_size > _MAX_INFLATE_RATIO * max(m.compress_size, 1 << 16)]
        if packed or total > limit:
            why = f"{packed[0].filename} inflates {packed[0].compress_size} bytes to {packed[0].file_size}" if packed \
                else f"its tensors take {total / 1e9:.3g} GB, over ECAMP_MAX_CHECKPOINT_GB={limit / 1e9:g}"
            raise InvalidWeightsFileError(f"{path} is not an ordinary PyTorch checkpoint: {why}; it was not read "
                                          f"(raise ECAMP_MAX_CHECKPOINT_GB for a genuinely larger one).", path=path)
    try:
        return read_authors_checkpoint(path)
    except InvalidWeightsFileError as e:
        text = str(e)
        if "Weights only load failed" not in text:
            raise
        if "Unsupported global" in text:
            raise InvalidWeightsFileError(f"{path} holds pickled Python objects besides tensors, which ecamp never "
                                          f"unpickles (they can run code); do not load an untrusted file with "
                                          f"weights_only=False: ask its source for a state dict of tensors or a "
                                          f"safetensors file.", path=path) from e
        # torch's reason without its advice to load with weights_only=False
        detail = [ln.strip() for ln in text.partition("WeightsUnpickler error:")[2].splitlines() if ln.strip()]
        raise InvalidWeightsFileError(f"{path} is not a readable PyTorch checkpoint (read with weights_only=True): "
                                      f"{(detail or ['not a torch.save file'])[0][:200]}.", path=path) from e


def _read_config(path: PathLike | None) -> ECAMPPretrainConfig | None:
    """``--config``: a small JSON object of :class:`ECAMPPretrainConfig` fields, each of its type, every size
    bounded as ``ecamp.load`` bounds an encoder (nothing is allocated for an absurd one)."""
    from .models.encoder import check_encoder_config
    from .schema import from_mapping

    if path is None:
        return None
    where = f"--config {path}"
    try:
        if Path(path).stat().st_size > _MAX_CONFIG_BYTES:
            raise InvalidArgumentError(f"{where} is over {_MAX_CONFIG_BYTES} bytes; a config of sizes is a few "
                                       f"hundred.", path=path)
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise InvalidArgumentError(f"{where} is not a JSON object of ECAMPPretrainConfig fields: {str(e)[:200]}",
                                   path=path) from e
    cfg = from_mapping(ECAMPPretrainConfig, data, error=InvalidArgumentError, source=where, path=path,
                       noun="field")
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool):
            continue
        if not math.isfinite(value) or value < 0 or (isinstance(value, int) and value < 1):
            raise InvalidArgumentError(f"{where}: {f.name} {value!r} is not a positive size.", path=path)
    for width, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads"),
                         ("text_hidden_size", "text_heads")):
        if getattr(cfg, width) % getattr(cfg, heads):
            raise InvalidArgumentError(f"{where}: {heads} {getattr(cfg, heads)} does not divide {width} "
                                       f"{getattr(cfg, width)}.", path=path)
    encoder = {k: getattr(cfg, k) for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                                            "mlp_ratio")}
    try:
        check_encoder_config({"model_args": encoder}, config_file=where)
        # the decoder and the text tower, bounded as encoders of their widths
        check_encoder_config({"model_args": {**encoder, "embed_dim": cfg.decoder_embed_dim,
                                             "depth": cfg.decoder_depth, "num_heads": cfg.decoder_num_heads}},
                             config_file=where)
        check_encoder_config({"model_args": {"embed_dim": cfg.text_hidden_size, "depth": cfg.text_layers,
                                             "num_heads": cfg.text_heads, "img_size": 16,
                                             "num_classes": min(cfg.vocab_size, 1_000_000)}}, config_file=where)
        cfg.validate()
    except ConfigError as e:
        raise InvalidArgumentError(str(e).replace("fix config.json, or pass", "fix --config; e.g."), path=path) \
            from e
    if cfg.vocab_size > 1_000_000 or cfg.max_text_len > 65536:
        raise InvalidArgumentError(f"{where}: vocab_size {cfg.vocab_size} or max_text_len {cfg.max_text_len} is "
                                   f"beyond any tokenizer (1000000, 65536).", path=path)
    return cfg


def convert(checkpoint: PathLike, name: str, *, out: PathLike | None = None, config: PathLike | None = None,
            tokenizer: PathLike | None = None, manifest: ManifestLike = None) -> dict[str, Any]:
    """Convert an authors'-format checkpoint into the folder of manifest entry ``name`` (default: the local store
    that ``ecamp.load(name)`` reads); returns ``{"out": folder, "files": [...], "original_sha256": ...}``."""
    from .hub import local_store_path

    entry = load_manifest(manifest).resolve(name)
    folder = Path(out) if out is not None else local_store_path(entry.name)
    return _convert(checkpoint, entry, folder, config=config, tokenizer=tokenizer,
                    provenance={"converted_from": str(checkpoint)})


def _convert(checkpoint: PathLike, entry: ModelEntry, folder: Path, *, config: PathLike | None,
             tokenizer: PathLike | None, provenance: Mapping[str, Any], sha256: str | None = None) -> dict[str, Any]:
    cfg = _read_config(config)
    if entry.kind != "pretrain" and tokenizer is not None:
        raise InvalidArgumentError("--tokenizer belongs to full pre-training models; an image encoder has no "
                                   "tokenizer.")
    if sha256 is None and Path(checkpoint).is_file():  # a missing file is reported by the reader below
        sha256 = sha256_file(checkpoint)
    prov = {**provenance, "original_file": entry.provenance.get("original_file"), "original_sha256": sha256}
    if entry.kind == "pretrain":
        from .models.pretrain import ECAMPPretrainModel

        try:
            model = ECAMPPretrainModel.from_authors(read_checkpoint(checkpoint), config=cfg)
        except WeightsMismatchError as e:
            raise WeightsMismatchError(str(e).replace("state dict", str(checkpoint), 1), path=checkpoint) from e
        block = EcampCfg.from_dict(entry.ecamp).replace(name=entry.name, provenance=prov)
        from .folders import save_pretrained

        files = save_pretrained(model, folder, tokenizer=tokenizer, ecamp_cfg=block)["files"]
    else:
        c = cfg or ECAMPPretrainConfig()
        pcfg, block = encoder_cfgs(entry, c.img_size, c.in_chans)
        encoder = encoder_from_authors(read_checkpoint(checkpoint), pretrained_cfg=pcfg, ecamp_cfg=block, config=c,
                                       source=str(checkpoint))
        files = export_encoder(encoder, entry, folder, provenance=prov)["files"]
    return {"out": str(folder), "files": files, "original_sha256": sha256}


def _recorded_provenance(folder: PathLike) -> dict[str, Any]:
    """The provenance a converted folder records in its ``config.json`` (``{}`` when there is none to read)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    prov = config.get("ecamp", {}).get("provenance") if isinstance(config, dict) else None
    return dict(prov) if isinstance(prov, Mapping) else {}


def _gdown() -> Any:
    try:
        import gdown
    except ImportError as e:
        raise MissingDependencyError(f"Downloading the authors' release needs gdown ({e.name} is missing): "
                                     f"pip install \"ecamp[authors]\"") from e
    import inspect

    if "timeout" not in inspect.signature(gdown.download).parameters:  # timeouts and retries came in gdown 6.3
        raise MissingDependencyError(f"gdown {getattr(gdown, '__version__', '?')} is too old for downloading the "
                                     f"authors' release: pip install -U \"gdown>=6.3\"")
    return gdown


def _download(gdown: Any, url: str, dest: Path, *, desc: str, progress: bool, timeout: float, retries: int,
              next_step: str) -> None:
    """``gdown.download`` of ``url`` to ``dest`` (gdown follows Drive's redirect and confirmation page), with
    ecamp's errors (ending in ``next_step``) and progress bar."""
    import requests

    from .console import progress_bar

    bar, seen = None, 0

    def on_chunk(done: int, total: int | None) -> None:
        nonlocal bar, seen
        if bar is None:
            bar = progress_bar(total=None if total is None else total >> 20, desc=desc, unit="MiB",
                               disable=not progress)
        bar.update((done >> 20) - seen)
        seen = done >> 20

    try:
        gdown.download(url, str(dest), quiet=True, progress=on_chunk, timeout=timeout, retries=retries)
    except gdown.exceptions.FileURLRetrievalError as e:  # Drive's quota, permission or unexpected page
        raise DownloadError(f"Google Drive did not hand out {url}: {' '.join(str(e).split())} {next_step}",
                            path=url) from e
    except gdown.exceptions.DownloadError as e:  # gdown keeps the partial file for its resume; ecamp does not
        what = "was cut off" if "incomplete" in str(e) else "failed"
        raise DownloadError(f"The download of {url} {what}: {str(e).splitlines()[0]} {next_step}", path=url) from e
    except requests.RequestException as e:
        raise DownloadError(f"Downloading {url} failed: {e}. {next_step}", path=url) from e
    finally:
        if bar is not None:
            bar.close()


def convert_from_authors(name: str, *, out: PathLike | None = None, config: PathLike | None = None,
                         tokenizer: PathLike | None = None, manifest: ManifestLike = None, force: bool = False,
                         progress: bool = True, timeout: float = 60.0, retries: int = 2) -> dict[str, Any]:
    """Download the authors' release of manifest entry ``name`` (its ``provenance.original_url``, a Google Drive
    link, through gdown: the ``authors`` extra) and convert it as :func:`convert` does, by default into the local
    store that ``ecamp.load(name)`` reads. Returns :func:`convert`'s result plus ``original_url``;
    ``original_sha256`` is the sha256 of the downloaded bytes, also recorded in the folder.

    The download goes to a temporary folder beside the destination that is deleted afterwards, so a failed, cut-off
    or refused download leaves the destination as it was. The authors' release is one fixed file, so a destination
    that records the sha256 of other bytes (a changed release, a corrupt download, or weights converted from
    another file) is not replaced unless ``force``. ``timeout`` is in seconds between bytes; ``retries`` resume a
    broken transfer.
    """
    import shutil
    import tempfile

    from .hub import local_store_path

    man = load_manifest(manifest)
    entry = man.resolve(name)
    alias = entry.aliases[0] if entry.aliases else entry.name
    original = Path(entry.provenance.get("original_file") or "checkpoint.pth").name
    url = entry.provenance.get("original_url")
    by_hand = f"`ecamp convert {original} --name {alias}`"
    if not url:
        raise InvalidArgumentError(f"The manifest {man.source} gives no download link for the authors' release of "
                                   f"{alias} ({entry.name}); if you have {original}, convert it with {by_hand}.")
    if timeout <= 0 or retries < 0:
        raise InvalidArgumentError(f"timeout must be positive and retries non-negative, got timeout={timeout}, "
                                   f"retries={retries}.")
    gdown = _gdown()  # a missing or old gdown is reported before anything is written
    folder = Path(out) if out is not None else local_store_path(entry.name)
    before = _recorded_provenance(folder).get("original_sha256")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.download-", dir=folder.parent))
    retry = (f"Nothing was written to {folder}. Retry the command; if it keeps failing, download {original} "
             f"in a browser and run {by_hand}.")
    try:
        path = tmp / original
        _download(gdown, url, path, desc=f"downloading {original}", progress=progress, timeout=timeout, retries=retries,
                  next_step=retry)
        with open(path, "rb") as f:
            head = f.read(512).lstrip()
        if head[:1] == b"<":  # a torch checkpoint starts with "PK" (zip) or a pickle opcode, never with a tag
            raise DownloadError(f"{url} sent an HTML page ({path.stat().st_size} bytes) instead of {original}: "
                                f"Google Drive's quota or sign-in page, or a link that is not a download. {retry}",
                                path=url)
        sha256 = sha256_file(path)
        label = f"{original} downloaded from {url} (sha256 {sha256})"
        try:
            if before and before != sha256 and not force:
                read_checkpoint(path)  # bytes that are no checkpoint at all are reported as such
                raise ChecksumMismatchError(
                    f"{folder} holds weights converted from a file with sha256 {before}, but {url} now sends "
                    f"{original} with sha256 {sha256}. The authors' release should not change: retry in case the "
                    f"download is corrupt; if the release did change or you converted another file there, pass "
                    f"--force (force=True) to replace them.", path=folder)
            result = _convert(path, entry, folder, config=config, tokenizer=tokenizer,
                              provenance={"converted_from": url, "original_url": url}, sha256=sha256)
        except InvalidWeightsFileError as e:
            # the reader's first line, with torch's advice about weights_only=False (wrong for a download) cut off
            head, sep, detail = str(e).splitlines()[0].replace(str(path), label).partition("): ")
            reason = f"{head}{sep}{detail.split('. ')[0]}".rstrip(".")
            raise InvalidWeightsFileError(f"{reason}. {retry}", path=url) from e
        except WeightsMismatchError as e:
            raise WeightsMismatchError(str(e).replace(str(path), label), path=url) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**result, "original_url": url}
