"""The model folders ecamp writes and reads: one module for every kind.

A folder is ``config.json`` + ``model.safetensors`` + a model card ``README.md`` (+ ``tokenizer.json`` for the
full pre-training model). Its kind (:data:`ecamp.config.FOLDER_KINDS`) decides the rest of ``config.json``:

* ``encoder`` / ``classification``: timm's format (``architecture``, ``num_classes``, ``model_args``,
  ``pretrained_cfg``), written by timm's ``save_for_hf``, so timm and transformers read it without ecamp;
* ``segmentation`` / ``detection``: the head (``head.kind``, ``head.args``), ``num_classes``, ``label_names``,
  ``input_size`` and the encoder's timm config (``encoder``);
* ``pretrain``: ``architecture: ecamp_pretrain`` and the model's sizes (``ecamp_pretrain_config``).

Every kind carries the :class:`~ecamp.config.EcampCfg` block under ``ecamp``. :func:`save_pretrained` writes any
kind, :func:`build` rebuilds any kind but the pre-training model (:func:`ecamp.load_pretrain` reads that one) from
its :class:`~ecamp.config.ModelConfig`, checking every size before allocating, and :func:`load_weights` loads
them strictly. Each file is written to a temporary name and renamed, so a crash never leaves a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .cards import find_entry, manifest_entry, model_card
from .config import DENSE_TASKS, EcampCfg, ModelConfig, ecamp_cfg_of
from .errors import ConfigError, InvalidArgumentError, InvalidWeightsFileError, WeightsMismatchError
from .fileio import atomic_write, sha256_file

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "TOKENIZER_NAME", "CARD_NAME", "kind_of", "num_outputs",
           "save_pretrained", "build", "load_weights"]

logger = logging.getLogger("ecamp")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
CARD_NAME = "README.md"
PathLike = str | os.PathLike

# a config.json is checked against these before anything is built (a hostile file must not exhaust the machine)
_MAX_OUTPUTS, _MAX_WIDTH, _MAX_LIST, _MAX_HEAD_PARAMS = 1024, 16384, 16, 2_000_000_000


def kind_of(obj: nn.Module | ModelConfig | Mapping[str, Any]) -> str:
    """The folder kind of a model, a :class:`~ecamp.config.ModelConfig` or a decoded ``config.json``: one of
    ``encoder``, ``classification``, ``segmentation``, ``detection``, ``pretrain``."""
    if isinstance(obj, ModelConfig):
        return obj.kind
    if isinstance(obj, Mapping):
        return ModelConfig.from_dict(obj).kind
    from .models.heads import HEAD_KINDS

    if isinstance(obj, tuple(HEAD_KINDS.values())):
        return obj.task
    if type(obj).__name__ == "ECAMPPretrainModel" and hasattr(obj, "to_encoder"):
        return "pretrain"
    task = ecamp_cfg_of(obj).task
    if task == "classification" or (task is None and getattr(obj, "num_classes", 0)):
        return "classification"
    return "encoder"


def num_outputs(model: nn.Module) -> int:
    """How many outputs a classifier or a dense-head model has (0 for an encoder)."""
    kind = kind_of(model)
    if kind in DENSE_TASKS:
        args = model.head_args
        return int(args["num_classes"] if "num_classes" in args else args["outputs"])
    return int(getattr(model, "num_classes", 0) or 0)


def _block(model: nn.Module, ecamp_cfg: EcampCfg | Mapping[str, Any] | None, fallback: nn.Module | None = None
           ) -> EcampCfg:
    """The block a folder of ``model`` records: the model's own (else ``fallback``'s), updated by ``ecamp_cfg``;
    ``source`` belongs to the loaded copy, not to the folder."""
    own = getattr(model, "ecamp_cfg", None) or (getattr(fallback, "ecamp_cfg", None) if fallback is not None
                                                else None)
    block = EcampCfg.from_dict(own).replace(source=None)
    if isinstance(ecamp_cfg, EcampCfg):
        return ecamp_cfg.replace(source=None)
    if ecamp_cfg:
        block = EcampCfg.from_dict({**block.to_dict(), **dict(ecamp_cfg)})
    return block


def _named(block: EcampCfg, name: str | None, kind: str = "encoder") -> EcampCfg:
    """``block`` under manifest name ``name``: a model that came from another entry records it as
    ``derived_from``."""
    if not name:
        return block
    previous = block.name
    if previous and previous != name and block.derived_from is None:
        was, now = find_entry(previous, kind), find_entry(name, kind)
        if was is None or now is None or was.name != now.name:
            block = block.replace(derived_from=previous)
    return block.replace(name=name)


def _labels(model: nn.Module, label_names: Sequence[str] | None, n: int) -> list[str]:
    labels = label_names if label_names is not None else getattr(model, "label_names", None) or \
        (getattr(model, "pretrained_cfg", None) or {}).get("label_names") or []
    labels = [str(v) for v in labels]
    if labels and len(labels) != n:
        raise InvalidArgumentError(f"{len(labels)} label names for a {type(model).__name__} with {n} outputs; give "
                                   f"one name per output.")
    return labels


def _shape_diff(model: nn.Module, probe: nn.Module) -> list[str]:
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    return sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])


def _finish(tmp: Path, out: Path, cfg: ModelConfig, *, name: str | None, hf_repo: str | None,
            names: Sequence[str]) -> dict[str, Any]:
    """Write the card, hash every file, move them into ``out``; returns the folder's manifest entry."""
    model_card(cfg, name=name or cfg.ecamp.name, hf_repo=hf_repo).save(tmp / CARD_NAME)
    files = [{"path": f, "sha256": sha256_file(tmp / f), "size": (tmp / f).stat().st_size}
             for f in (*names, CARD_NAME)]
    out.mkdir(parents=True, exist_ok=True)
    stale = [f for f in (TOKENIZER_NAME,) if f not in names and (out / f).is_file()]
    for f in stale:  # a tokenizer of an earlier save would be read as this model's
        (out / f).unlink()
    # weights before config.json: an interrupted overwrite never pairs a new config with old weights
    for f in sorted(files, key=lambda f: f["path"] == CONFIG_NAME):
        os.replace(tmp / f["path"], out / f["path"])
    own_name, entry = manifest_entry(cfg, hf_repo=hf_repo)
    entry["files"] = files
    logger.info("Wrote %s: %s", out, ", ".join(f"{f['path']} ({f['size']} bytes, sha256 {f['sha256']})"
                                             for f in files))
    return {"name": own_name, **entry}


def save_pretrained(model: nn.Module, out_dir: PathLike, *, name: str | None = None, hf_repo: str | None = None,
                    ecamp_cfg: EcampCfg | Mapping[str, Any] | None = None, model_args: dict | None = None,
                    label_names: Sequence[str] | None = None, tokenizer: Any = None) -> dict[str, Any]:
    """Write ``model`` as an ecamp folder of its kind and return its manifest entry (with the files' sha256 and
    size, and its ``name``).

    Args:
        model: a timm encoder or classifier (``ecamp.load``, ``timm.create_model``), a segmentation or detection
            model (:mod:`ecamp.models.heads`) or an :class:`~ecamp.models.ECAMPPretrainModel`.
        name: the manifest name to record (a model that came from another entry records it as
            ``ecamp.derived_from``).
        hf_repo: the Hub repo the folder is meant for (named in its card and ``pretrained_cfg``).
        ecamp_cfg: the :class:`~ecamp.config.EcampCfg` to record, or fields updating the model's own.
        model_args: timm constructor arguments, where ``model``'s own do not rebuild it.
        label_names: one per output (default: the model's ``label_names``); timm and transformers read them
            (``id2label`` of ``AutoModelForImageClassification``).
        tokenizer: the pre-training model's tokenizer (a path or a ``tokenizers.Tokenizer``).

    A folder that would not rebuild the model is refused before anything is written.
    """
    kind = kind_of(model)
    out = Path(out_dir)
    if kind == "pretrain" and (model_args or label_names is not None):
        raise InvalidArgumentError("model_args= and label_names= apply to image models; the pre-training model "
                                   "records its sizes itself and has no classes.")
    if kind != "pretrain" and tokenizer is not None:
        raise InvalidArgumentError("tokenizer= belongs to the full pre-training model; an image model has none.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if kind == "pretrain":
            cfg, names = _write_pretrain(model, tmp, _named(_block(model, ecamp_cfg), name, "pretrain"), tokenizer)
            return _finish(tmp, out, cfg, name=name, hf_repo=hf_repo, names=names)
        if kind in DENSE_TASKS:
            if model_args:
                raise InvalidArgumentError("model_args= applies to timm encoders and classifiers; a dense model's "
                                           "head records its own arguments.")
            cfg = _write_dense(model, tmp, _named(_block(model, ecamp_cfg, model.encoder), name), label_names)
        else:
            cfg = _write_timm(model, tmp, _named(_block(model, ecamp_cfg), name), model_args, label_names, hf_repo)
        return _finish(tmp, out, cfg, name=name, hf_repo=hf_repo, names=(CONFIG_NAME, WEIGHTS_NAME))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- timm encoders and classifiers ------------------------------------------------------------------------------------
def _model_args_for_export(model: nn.Module, extra: dict | None) -> dict:
    """Arguments that rebuild ``model`` with ``timm.create_model(architecture, **args)``."""
    args = {k: v for k, v in dict(getattr(model, "_model_args", None) or {}).items()
            if k not in ("pretrained_cfg", "pretrained_cfg_overlay", "device", "dtype", "pretrained_model_args",
                         "cache_dir") and not k.endswith("drop_rate")}
    if hasattr(model, "global_pool") and isinstance(model.global_pool, str):
        args["global_pool"] = model.global_pool
    if hasattr(model, "fc_norm"):
        args["fc_norm"] = not isinstance(model.fc_norm, nn.Identity)
    args.update(extra or {})
    args.pop("num_classes", None)  # set by timm from the model itself
    return args


def _check_rebuild(model: nn.Module, architecture: str, args: dict) -> None:
    """Refuse to write a folder whose config would not rebuild the model (timm would fail to load it)."""
    import timm

    try:
        with torch.device("meta"):
            probe = timm.create_model(architecture, pretrained=False, num_classes=model.num_classes, **args)
    except Exception as e:  # noqa: BLE001 - any build failure means the config is unusable
        raise InvalidArgumentError(f"timm cannot rebuild {architecture} from model_args {args}: {e}. Pass "
                                   f"model_args= to save_pretrained.") from e
    diff = _shape_diff(model, probe)
    if diff:
        raise InvalidArgumentError(f"timm.create_model({architecture!r}, **{args}) does not rebuild this model "
                                   f"(differs in {diff[:5]}); pass the constructor arguments as model_args= to "
                                   f"save_pretrained.")


# transformers' problem_type for each activation: its image-classification pipeline applies sigmoid to a
# multi-label model's logits and softmax to a single-label one's, as ecamp.predict does
_PROBLEM_TYPES = {"sigmoid": "multi_label_classification", "softmax": "single_label_classification"}


def _transformers_fields(block: EcampCfg, labels: Sequence[str], n: int) -> dict[str, Any]:
    """What transformers' ``TimmWrapperConfig`` reads from a classifier's ``config.json`` besides timm's fields:
    ``problem_type`` (from the head's activation) and ``id2label``/``label2id`` (it derives them from
    ``label_names`` too; written so that readers of the plain config see them)."""
    fields: dict[str, Any] = {}
    if n < 1:
        return fields
    problem = _PROBLEM_TYPES.get(block.activation or "")
    # transformers refuses single_label_classification with one output (softmax over one class is always 1)
    if problem and not (problem == "single_label_classification" and n == 1):
        fields["problem_type"] = problem
    if labels:
        fields["id2label"] = {str(i): name for i, name in enumerate(labels)}
        if len(set(labels)) == len(labels):
            fields["label2id"] = {name: i for i, name in enumerate(labels)}
    return fields


def _write_timm(model: nn.Module, tmp: Path, block: EcampCfg, model_args: dict | None,
                label_names: Sequence[str] | None, hf_repo: str | None) -> ModelConfig:
    from timm.models import save_for_hf

    architecture = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    if not architecture:
        raise InvalidArgumentError(f"{type(model).__name__} has no pretrained_cfg['architecture']; save_pretrained "
                                   f"writes timm models built by ecamp.load or timm.create_model, ecamp's dense "
                                   f"heads and the pre-training model.")
    args = _model_args_for_export(model, model_args)
    labels = _labels(model, label_names, getattr(model, "num_classes", 0))
    _check_rebuild(model, architecture, args)
    model_config: dict[str, Any] = {"ecamp": block.to_dict()}
    if labels:
        model_config["label_names"] = labels
    model_config.update(_transformers_fields(block, labels, int(getattr(model, "num_classes", 0) or 0)))
    save_for_hf(model, str(tmp), model_config=model_config, model_args=args, safe_serialization=True)
    config = json.loads((tmp / CONFIG_NAME).read_text())
    # num_classes stays at the config's root only: transformers' TimmWrapper passes model_args and num_classes to
    # timm.create_model side by side, so a copy in model_args breaks AutoModel
    config.get("model_args", {}).pop("num_classes", None)
    if hf_repo:
        config["pretrained_cfg"]["hf_hub_id"] = hf_repo
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return ModelConfig.from_dict(config)


# -- the full pre-training model ------------------------------------------------------------------------------------
def _write_pretrain(model: nn.Module, tmp: Path, block: EcampCfg, tokenizer: Any) -> tuple[ModelConfig, list[str]]:
    """``config.json`` (architecture ``ecamp_pretrain``, the model's sizes, the block), the weights and, if given,
    ``tokenizer.json``; :meth:`ECAMPPretrainModel.from_folder <ecamp.models.ECAMPPretrainModel.from_folder>` reads
    them."""
    from safetensors.torch import save_model

    from .config import PRETRAIN_ARCHITECTURE

    config = {"architecture": PRETRAIN_ARCHITECTURE, "ecamp_pretrain_config": model.config.to_dict(),
              "ecamp": block.to_dict()}
    (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    save_model(model, str(tmp / WEIGHTS_NAME))
    names = [CONFIG_NAME, WEIGHTS_NAME]
    if tokenizer is not None:
        from .text import load_tokenizer

        (tmp / TOKENIZER_NAME).write_text(load_tokenizer(tokenizer).to_str())
        names.append(TOKENIZER_NAME)
    return ModelConfig.from_dict(config), names


# -- segmentation and detection models --------------------------------------------------------------------------------
def _encoder_config(encoder: nn.Module) -> dict[str, Any]:
    """The timm-format config that rebuilds ``encoder``. Its ``pretrained_cfg`` says ``crop_mode="squash"``: a
    dense head sees the whole image resized, never a crop."""
    from timm.models import filter_pretrained_cfg, get_model_args

    pcfg = filter_pretrained_cfg({k: v for k, v in dict(encoder.pretrained_cfg).items() if k != "state_dict"},
                                 remove_source=True, remove_null=True)
    pcfg.update(crop_mode="squash", crop_pct=1.0)
    args = {k: list(v) if isinstance(v, tuple) else v for k, v in get_model_args(encoder).items()
            if k != "num_classes"}
    return {"architecture": pcfg.pop("architecture"), "num_classes": int(encoder.num_classes),
            "num_features": int(encoder.num_features), "model_args": args, "pretrained_cfg": pcfg}


def _write_dense(model: nn.Module, tmp: Path, block: EcampCfg, label_names: Sequence[str] | None) -> ModelConfig:
    from safetensors.torch import save_file

    from .models.heads import HEAD_KINDS

    kind = next((k for k, cls in HEAD_KINDS.items() if type(model) is cls), None)
    if kind is None:
        raise InvalidArgumentError(f"save_pretrained writes {', '.join(c.__name__ for c in HEAD_KINDS.values())}, "
                                   f"not a subclass such as {type(model).__name__}.")
    n_out = num_outputs(model)
    labels = _labels(model, label_names, n_out)
    enc = _encoder_config(model.encoder)
    config = {"head": {"kind": kind, "args": dict(model.head_args)}, "num_classes": n_out, "label_names": labels,
              "input_size": list(enc["pretrained_cfg"]["input_size"]), "encoder": enc,
              "ecamp": block.replace(task=model.task).to_dict()}
    try:
        config = json.loads(json.dumps(config))
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"The config of this {type(model).__name__} is not JSON: {e}.") from e
    cfg = ModelConfig.from_dict(config, where="the config being written")
    with torch.device("meta"):  # refuse a folder that would not load back
        diff = _shape_diff(model, _build_dense(cfg, "the config being written"))
    if diff:
        raise InvalidArgumentError(f"config.json would not rebuild this {type(model).__name__} (differs in "
                                   f"{diff[:5]}); was the head changed after it was built?")
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(tmp / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    atomic_write(tmp / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8"))
    return cfg


def _check_head_args(args: Any, where: str) -> dict[str, Any]:
    if not isinstance(args, Mapping):
        raise ConfigError(f"{where}: head.args must be a JSON object, got {type(args).__name__}.")

    def fail(name: str, value: Any, what: str):
        raise ConfigError(f"{where}: head.args.{name} {value!r} is not {what}; fix config.json or re-export the "
                          f"folder.")

    for name, value in args.items():
        top = _MAX_OUTPUTS if name in ("outputs", "num_classes") else _MAX_WIDTH
        if isinstance(value, bool) or isinstance(value, str):
            continue
        if isinstance(value, float):
            if not 0.0 <= value <= 1.0:
                fail(name, value, "a threshold in [0, 1]")
        elif isinstance(value, int):
            if not 1 <= value <= top:
                fail(name, value, f"a size in 1..{top}")
        elif isinstance(value, list):
            if not 1 <= len(value) <= _MAX_LIST or not all(
                    isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= _MAX_WIDTH for v in value):
                fail(name, value, f"a list of at most {_MAX_LIST} sizes in 1..{_MAX_WIDTH}")
        else:
            fail(name, value, "a number, string or list of sizes")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}


def _build_dense(cfg: ModelConfig, where: str, config_file: Any = None) -> nn.Module:
    from .models.encoder import build_encoder, check_encoder_config
    from .models.heads import HEAD_KINDS

    head = cfg.data.get("head")
    if not isinstance(head, Mapping) or head.get("kind") not in HEAD_KINDS:
        raise ConfigError(f"{where}: a fine-tuned {cfg.kind} model needs head.kind (one of {sorted(HEAD_KINDS)}), "
                          f"head.args and an encoder block; re-export the folder.", path=config_file)
    cls = HEAD_KINDS[head["kind"]]
    args = _check_head_args(head.get("args") or {}, where)
    check_encoder_config(cfg.timm, config_file=config_file or where)
    try:
        with torch.device("meta"):
            probe = cls(build_encoder(cfg.timm), **args)
    except (TypeError, InvalidArgumentError) as e:
        raise ConfigError(f"{where}: {cls.__name__} cannot be built from head.args {dict(head.get('args'))}: "
                          f"{e}", path=config_file) from e
    size = sum(p.numel() for p in probe.parameters()) - sum(p.numel() for p in probe.encoder.parameters())
    if size > _MAX_HEAD_PARAMS:
        raise ConfigError(f"{where}: head.args give a head of {size:.2g} parameters, over the "
                          f"{_MAX_HEAD_PARAMS:.0e} ecamp.load builds.", path=config_file)
    return cls(build_encoder(cfg.timm), **args).eval()


# -- rebuilding any kind ----------------------------------------------------------------------------------------------
def build(cfg: ModelConfig, *, config_file: Any = "config.json", label: str = "", weights: PathLike | None = None,
          num_classes: int | None = None, global_pool: str | None = None, **timm_kwargs: Any) -> nn.Module:
    """The (randomly initialised) model ``cfg`` describes, every size checked before anything is allocated; it
    carries ``cfg.ecamp`` as ``ecamp_cfg`` and the folder's ``label_names``. ``num_classes``, ``global_pool`` and
    timm keyword arguments change encoders and classifiers only. ``weights`` (a safetensors file) is checked
    against the config's sizes before building."""
    from .errors import NotAnEncoderError
    from .models.encoder import build_encoder, check_encoder_config

    where = f"{config_file}{f' ({label})' if label else ''}"
    if cfg.kind == "pretrain":
        raise NotAnEncoderError(f"{label or config_file} is a full pre-training model (encoder, decoder, text "
                                f"model); ecamp.load builds image models. Load it with ecamp.load_pretrain.")
    if cfg.dense:
        if num_classes is not None or global_pool is not None or timm_kwargs:
            raise InvalidArgumentError(f"{label or config_file} is a fine-tuned {cfg.kind} model; num_classes, "
                                       f"global_pool and timm keyword arguments apply to encoders and classifiers "
                                       f"only.")
        model = _build_dense(cfg, where, config_file)
    else:
        # a hostile or broken config.json is refused here, before build_encoder allocates what it asks for
        check_encoder_config(cfg.data, overrides={**timm_kwargs, "num_classes": num_classes}, weights=weights,
                             config_file=config_file, label=label)
        model = build_encoder(cfg.data, num_classes=num_classes, global_pool=global_pool, **timm_kwargs)
    labels = cfg.label_names
    if labels and (cfg.dense or num_classes is None or num_classes == cfg.num_classes):
        model.label_names = labels
        if not cfg.dense:
            model.pretrained_cfg["label_names"] = list(labels)  # as timm's hf-hub loader keeps them
    return model


def load_weights(model: nn.Module, weights: PathLike, *, source: str) -> None:
    """Load a folder's ``model.safetensors`` into ``model`` strictly: anything missing, unexpected or mis-shaped
    raises :class:`~ecamp.errors.WeightsMismatchError` (an encoder's replaced head excepted, and logged)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .models.encoder import load_encoder_state_dict

    try:
        state_dict = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidWeightsFileError(f"{weights} ({source}) is not a readable safetensors file: {e}. Re-fetch or "
                                      f"re-export it.", path=weights) from e
    if kind_of(model) not in DENSE_TASKS:
        load_encoder_state_dict(model, state_dict, source=source)
        return
    target = model.state_dict()
    missing = [k for k in target if k not in state_dict]
    unexpected = [k for k in state_dict if k not in target]
    bad = [f"{k}: weights {tuple(state_dict[k].shape)} vs model {tuple(target[k].shape)}" for k in state_dict
           if k in target and state_dict[k].shape != target[k].shape]
    if missing or unexpected or bad:
        parts = [f"{what} {', '.join(keys[:6])}" + (f" and {len(keys) - 6} more" if len(keys) > 6 else "")
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad)) if keys]
        raise WeightsMismatchError(f"Weights from {source} do not fit {type(model).__name__}: {'; '.join(parts)}. "
                                   f"config.json and model.safetensors do not belong together; re-export the "
                                   f"folder.")
    model.load_state_dict(state_dict)
