"""MkDocs hook: reference tables generated from the code, so they follow it.

Placeholders (an HTML comment on a line of its own) that a page can hold:

``<!-- ecamp:config-keys pretrain -->``
    every key of the pre-training run config (``ecamp.train.pretrain.config.PretrainRunConfig``: its sections
    ``model``, ``text``, ``data``, ``optim``, ``run``) with type, default and meaning, and what each shipped
    pre-training preset changes;
``<!-- ecamp:config-keys finetune -->``
    the keys of a fine-tuning preset (``ecamp.train.downstream.recipes``) and every shipped preset's values;
``<!-- ecamp:config-keys ecamp-block -->``
    the fields of the ``ecamp`` block of ``config.json`` (:class:`ecamp.config.EcampCfg`);
``<!-- ecamp:top-level -->``
    the names ``import ecamp`` offers lazily (``ecamp/__init__.py``), each linked to the module that defines it;
``<!-- ecamp:modules PACKAGE -->``
    a ``::: module`` block for every module of PACKAGE (one level down) that declares ``__all__``.

A key's meaning is the comment on (or right above) its line in the dataclass, else the entry of :data:`MEANINGS`
below; a key with neither is rendered as :data:`MISSING`, which ``tests/test_docs.py`` refuses.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import re
import textwrap
import tokenize
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MISSING = "(no description yet)"
_PLACEHOLDER = re.compile(r"^<!-- ecamp:(?P<what>[\w-]+)(?: (?P<arg>[\w.-]+))? -->$", re.M)

_FIDELITY = "a fidelity option ([fidelity options](../fidelity.md))"

# Meanings of the keys whose definition carries no comment (``ClassName.field``).
MEANINGS: dict[str, str] = {
    # model (ecamp.models.ECAMPPretrainConfig)
    "ECAMPPretrainConfig.img_size": "encoder input side in pixels; the data's crop is this times `sr_scale` and is "
                                    "downsampled (bicubic) for the encoder",
    "ECAMPPretrainConfig.patch_size": "ViT patch side in pixels (grid = `img_size / patch_size`)",
    "ECAMPPretrainConfig.in_chans": "image channels (grey films are read as three equal channels)",
    "ECAMPPretrainConfig.embed_dim": "ViT encoder width",
    "ECAMPPretrainConfig.depth": "ViT encoder blocks",
    "ECAMPPretrainConfig.num_heads": "ViT encoder attention heads",
    "ECAMPPretrainConfig.mlp_ratio": "MLP hidden size over width, encoder and decoder",
    "ECAMPPretrainConfig.decoder_embed_dim": "MAE decoder width",
    "ECAMPPretrainConfig.decoder_depth": "MAE decoder blocks",
    "ECAMPPretrainConfig.decoder_num_heads": "MAE decoder attention heads",
    "ECAMPPretrainConfig.mask_ratio": "share of the patches masked for MIM (the patches with the smallest noise stay "
                                      "visible)",
    "ECAMPPretrainConfig.sr_scale": "super-resolution factor: the SR target is `img_size x sr_scale` pixels",
    "ECAMPPretrainConfig.sr_window": "side of the super-resolution window, in patches of the grid (12 of 14)",
    "ECAMPPretrainConfig.vocab_size": "WordPiece vocabulary size",
    "ECAMPPretrainConfig.text_hidden_size": "BERT hidden size (text side)",
    "ECAMPPretrainConfig.text_layers": "BERT layers after the context-fusion layer",
    "ECAMPPretrainConfig.text_heads": "BERT attention heads",
    "ECAMPPretrainConfig.text_intermediate_size": "BERT feed-forward size",
    "ECAMPPretrainConfig.max_text_len": "tokens per report (BERT positions)",
    "ECAMPPretrainConfig.text_dropout": "dropout of the BERT hidden states and attention",
    "ECAMPPretrainConfig.mim_weight": "weight of the masked-image-modelling loss in the sum",
    "ECAMPPretrainConfig.sr_weight": "weight of the super-resolution loss in the sum",
    "ECAMPPretrainConfig.mlm_weight": "weight of the weighted MLM loss in the sum (0: the encoder gets no gradient "
                                      "from the reports, `ecamp demo --ablation`)",
    "ECAMPPretrainConfig.norm_pix_loss": f"MAE per-patch normalised MIM targets; {_FIDELITY}",
    "ECAMPPretrainConfig.pixel_loss_over_region": "MIM and SR losses averaged over the masked patches / the window "
                                                  f"instead of over all pixels; {_FIDELITY}",
    "ECAMPPretrainConfig.sr_final_relu": f"the SR head ends in ReLU (the authors'); {_FIDELITY}",
    "ECAMPPretrainConfig.encoder_resize_antialias": f"antialias the downsample of the encoder input; {_FIDELITY}",
    "ECAMPPretrainConfig.tie_word_embeddings": f"tie the MLM decoder to the word embeddings; {_FIDELITY}",
    "ECAMPPretrainConfig.xavier_text_init": f"xavier-uniform init of every BERT linear layer (the authors'); "
                                            f"{_FIDELITY}",
    # text (ecamp.text.MaskingConfig)
    "MaskingConfig.mask_prob": "share of the words masked in a report that names an entity (whole words: `##` "
                               "pieces follow their word)",
    "MaskingConfig.mask_prob_no_entity": "share of the words masked in a report without an entity",
    "MaskingConfig.entity_mask_prob": "share of the entity words masked in the second pass",
    "MaskingConfig.context_prob": "probability of inserting the LLM context into the report (at a random sentence "
                                  "boundary)",
    "MaskingConfig.template_weight": "MLM weight of the template tokens (\"there is no (evidence of)\"); their mass "
                                     "moves to the descriptors",
    "MaskingConfig.num_descriptors": "tokens before an entity counted as its descriptors (a '.' skipped)",
    "MaskingConfig.entities": "the entity list (`ecamp.text.ENTITIES`)",
    "MaskingConfig.templates": "the down-weighted templates (`ecamp.text.TEMPLATES`)",
    "MaskingConfig.lowercase_entities": f"match the entity list case-insensitively (so `COPD` counts); {_FIDELITY}",
    "MaskingConfig.force_mask_descriptors": f"always mask the descriptors; {_FIDELITY}",
    "MaskingConfig.labels_on_all_positions": "MLM targets on every position, padding included (the authors'); false: "
                                             f"masked positions only; {_FIDELITY}",
    "MaskingConfig.mlm_ignore_padding": f"no MLM target on padding positions; {_FIDELITY}",
    # data / optim / run (ecamp.train.pretrain.config)
    "DataConfig.crop_scale": "random resized crop: range of the crop's area (share of the image)",
    "DataConfig.mean": "normalisation mean (grey, all three channels)",
    "DataConfig.std": "normalisation standard deviation",
    "DataConfig.hflip": "random horizontal flips",
    "OptimConfig.min_lr": "learning rate at the end of the cosine",
    "OptimConfig.betas": "AdamW betas",
    "OptimConfig.weight_decay": "AdamW weight decay (not on biases and norms)",
    "OptimConfig.accum_iter": "gradient accumulation steps per optimizer step",
    "OptimConfig.epochs": "epochs trained",
    "OptimConfig.warmup_epochs": "linear warm-up, in epochs",
    "OptimConfig.clip_grad": "gradient-norm clipping (null: none)",
    "RunConfig.seed": "seed of every random draw (samples are a function of seed, epoch and index)",
    "RunConfig.keep_last": "checkpoints kept (the newest)",
    # fine-tuning presets (ecamp.train.downstream.recipes.Recipe)
    "Recipe.steps": "optimizer steps (`--max-steps` caps them)",
    "Recipe.lr": "peak learning rate (`--lr`)",
    "Recipe.warmup": "linear warm-up steps before the cosine (`--warmup`)",
    "Recipe.batch_size": "global batch size, all processes together (`--batch-size`)",
    "Recipe.weight_decay": "weight decay",
    "Recipe.eval_batch_size": "batch size of validation and test",
    # the ecamp block (ecamp.config.EcampCfg)
    "EcampCfg.modality": "`cxr` or `fundus`",
    "EcampCfg.image_policy": "intensity policy of the image reader: `bits`, `minmax`, `voi` or `mimic-cxr-jpg` "
                             "([policies](../loading.md#intensity-policies))",
    "EcampCfg.grayscale": "read images grey, as three equal channels (colour fundus photos too, as the authors)",
    "EcampCfg.fov_crop": "crop a fundus photo to its field of view and pad it to a square",
    "EcampCfg.notes": "free text about the preprocessing",
    "EcampCfg.name": "the manifest name the folder is, or was exported as",
    "EcampCfg.derived_from": "the manifest entry its weights come from, under another name",
    "EcampCfg.base_model": "the model a fine-tuning started from",
    "EcampCfg.description": "one line about the model",
    "EcampCfg.provenance": "conversion or training record (e.g. `original_sha256` of a converted release)",
    "EcampCfg.task": "`classification`, `segmentation` or `detection` for a fine-tuned model; absent for an encoder",
    "EcampCfg.activation": "a classifier's output activation: `sigmoid` (multi-label) or `softmax` (multi-class)",
    "EcampCfg.dense_input": "how a segmentation or detection model reads images: `resize` (`bilinear` or the "
                            "authors' `nearest`) and `rgb`",
    "EcampCfg.calibration": "a classifier's calibration fitted on its validation split: `method` (`temperature` or "
                            "`platt`), per-output `scale` and `bias` applied to the logits, `fitted_on`, `n` "
                            "([Your own data](../own-data.md))",
    "EcampCfg.operating_points": "a classifier's per-label decision thresholds: `rule` (`youden`, "
                                 "`sensitivity=X`, `specificity=X`), `thresholds` on calibrated and "
                                 "`raw_thresholds` on uncalibrated probabilities",
    "EcampCfg.finetune": "how a fine-tuned model was trained: data set, fraction, mode, best step and score",
    "EcampCfg.data": "a full pre-training model: how its run read the images",
    "EcampCfg.source": "where a loaded copy came from (set by the loader, never written)",
    "EcampCfg.extra": "keys a newer ecamp wrote, kept and written back unchanged",
}

_RUN_KEY_MEANINGS = {
    "head": "`cls`, `seg` or `det`",
    "dataset": "the data set (`--dataset`)",
    "fraction": "percent of the training labels: 1, 10 or 100 (`--fraction`)",
    "mode": "`finetune` or `linear-probe` (classification only; `--mode`)",
}


# --------------------------------------------------------------------------------------------------------------
# dataclass fields


@dataclasses.dataclass
class Key:
    name: str
    type: str
    default: str
    meaning: str


def _comments(cls: type) -> dict[str, str]:
    """``{field: comment}``: the comment on a field's line(s), or the comment lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    tree = ast.parse(source)
    body = tree.body[0].body  # type: ignore[attr-defined]
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    out: dict[str, str] = {}
    for node in body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        trailing = [comments[n] for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in comments]
        above = []
        n = node.lineno - 1
        while n >= 1 and n in comments and lines[n - 1].strip().startswith("#"):
            above.insert(0, comments[n])
            n -= 1
        text = " ".join(above + trailing).strip()
        if text:
            out[node.target.id] = text
    return out


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        factory = f.default_factory  # type: ignore[misc]
        if isinstance(factory, type) and dataclasses.is_dataclass(factory):
            return f"`{factory.__name__}()`"
        value = factory()
    else:
        return "required"
    if isinstance(value, tuple) and len(repr(value)) > 40:
        return f"{len(value)} items"
    if value is None:
        return "`null`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, tuple):
        return f"`{list(value)}`"
    if isinstance(value, str):
        return f'`"{value}"`' if value else '`""`'
    if isinstance(value, dict) and not value:
        return "`{}`"
    return f"`{value!r}`"


def _type(f: dataclasses.Field) -> str:
    t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", repr(f.type))
    return "`" + t.replace("|", "\\|") + "`"


def keys_of(cls: type) -> list[Key]:
    """Every field of the dataclass ``cls`` with its type, default and meaning."""
    comments = _comments(cls)
    out = []
    for f in dataclasses.fields(cls):
        meaning = MEANINGS.get(f"{cls.__name__}.{f.name}") or comments.get(f.name) or MISSING
        choices = f.metadata.get("choices") if f.metadata else None
        if choices and "one of" not in meaning:
            meaning += "; one of " + ", ".join(f"`{c}`" for c in choices)
        out.append(Key(f.name, _type(f), _default(f), meaning))
    return out


def _table(keys: list[Key], prefix: str = "") -> str:
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    rows += [f"| `{prefix}{k.name}` | {k.type} | {k.default} | {k.meaning.replace('|', '/')} |" for k in keys]
    return "\n".join(rows) + "\n"


# --------------------------------------------------------------------------------------------------------------
# the three config pages


def _pretrain_keys() -> str:
    import yaml

    from ecamp.train.presets import list_presets, preset_path
    from ecamp.train.pretrain.config import PretrainRunConfig

    out = []
    defaults = PretrainRunConfig()
    for name in (f.name for f in dataclasses.fields(PretrainRunConfig)):
        cls = type(getattr(defaults, name))
        doc = inspect.getdoc(cls) or ""
        first = doc.split("\n\n")[0].replace("\n", " ")
        out.append(f"### `{name}`\n\n`{cls.__module__}.{cls.__qualname__}`" + (f": {first}" if first else "")
                   + "\n\n" + _table(keys_of(cls), f"{name}.") + "\n")
    out.append("### What the presets set\n\nEach shipped pre-training preset (`ecamp train pretrain --config NAME`) "
               "and the keys it sets to something other than the default above:\n\n")
    flat_default = _flatten(defaults.to_dict())
    for preset in list_presets("pretrain")["pretrain"]:
        path = preset_path(preset, "pretrain")
        data = _flatten(yaml.safe_load(path.read_text(encoding="utf-8")) or {})
        changed = {k: v for k, v in data.items() if _norm(flat_default.get(k, object())) != _norm(v)}
        lead = []
        for line in path.read_text(encoding="utf-8").splitlines():  # the comment block the file opens with
            if not line.startswith("#"):
                break
            lead.append(line.lstrip("#").strip())
        first = re.split(r"(?<=\.)\s", " ".join(lead), maxsplit=1)[0]
        items = ", ".join(f"`{k}={_yaml_value(v)}`" for k, v in changed.items()) or "nothing (the defaults)"
        out.append(f"- **`{preset}`**: {first} It sets {items}.\n")
    return "".join(out)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _norm(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_norm(x) for x in v)
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return float(v)
    return v


def _yaml_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    return str(v)


def _finetune_keys() -> str:
    from ecamp.train.downstream.recipes import RECIPES, Recipe
    from ecamp.train.presets import list_presets

    keys = [Key(k, {"fraction": "`int`"}.get(k, "`str`"), "", m) for k, m in _RUN_KEY_MEANINGS.items()]
    keys += keys_of(Recipe)
    out = [_table(keys), "\n"]
    names = set(list_presets("finetune")["finetune"])
    fields = [f.name for f in dataclasses.fields(Recipe)]
    out.append("### The shipped presets\n\nOne per row of the authors' hyper-parameter tables "
               "(`ecamp train finetune --config NAME`; `ecamp train presets finetune` lists them):\n\n")
    out.append("| preset | " + " | ".join(f"`{f}`" for f in fields) + " |\n")
    out.append("|---|" + "---|" * len(fields) + "\n")
    for (head, task, fraction, mode), r in RECIPES.items():
        name = f"{head}_{task}_{fraction}_{mode}"
        shown = f"`{name}`" if name in names else f"`{name}` (no file)"
        out.append(f"| {shown} | " + " | ".join(_yaml_value(getattr(r, f)) for f in fields) + " |\n")
    return "".join(out)


def _ecamp_block_keys() -> str:
    from ecamp.config import EcampCfg

    return _table(keys_of(EcampCfg))


# --------------------------------------------------------------------------------------------------------------
# API pages


def _lazy_names() -> dict[str, str]:
    """``ecamp/__init__.py``'s ``_LAZY`` (name -> defining module), read without importing anything."""
    tree = ast.parse((ROOT / "ecamp" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in targets):
            return ast.literal_eval(node.value)  # type: ignore[arg-type]
    return {}


def _top_level() -> str:
    rows = ["| name | defined in |", "|---|---|"]
    for name, module in _lazy_names().items():
        rows.append(f"| [`ecamp.{name}`][ecamp.{module}.{name}] | [`ecamp.{module}`][ecamp.{module}] |")
    return "\n".join(rows) + "\n"


def _has_all(path: Path) -> bool:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return False
    for node in tree.body:
        targets = [node.target] if isinstance(node, ast.AnnAssign) else getattr(node, "targets", [])
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            return True
    return False


def documented_modules(package: str) -> list[str]:
    """The modules of ``package`` (one level down, packages by their ``__init__``) that declare ``__all__``."""
    folder = ROOT.joinpath(*package.split("."))
    out = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("_"):
            continue
        if path.is_dir() and (path / "__init__.py").is_file() and _has_all(path / "__init__.py"):
            out.append(f"{package}.{path.name}")
        elif path.suffix == ".py" and _has_all(path):
            out.append(f"{package}.{path.stem}")
    return out


def _unpacked_exports(module: str) -> str:
    """Source lines that bind exported names by tuple unpacking (``A, B = 14, 12``), which griffe does not read,
    so the page still shows them."""
    path = ROOT.joinpath(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    source = path.read_text(encoding="utf-8")
    tree = ast.parse(source)
    lines = []
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Tuple) for t in node.targets):
            lines.append(ast.get_source_segment(source, node))
    if not lines:
        return ""
    return f"`{module}` also exports:\n\n```python\n" + "\n".join(lines) + "\n```\n"


def _modules(package: str) -> str:
    out = []
    for m in documented_modules(package):
        out.append(f"::: {m}\n")
        extra = _unpacked_exports(m)
        if extra:
            out.append(extra)
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------


def _render(what: str, arg: str | None) -> str:
    if what == "config-keys":
        return {"pretrain": _pretrain_keys, "finetune": _finetune_keys, "ecamp-block": _ecamp_block_keys}[arg]()
    if what == "top-level":
        return _top_level()
    if what == "modules" and arg:
        return _modules(arg)
    raise ValueError(f"Unknown placeholder <!-- ecamp:{what} {arg or ''} -->")


def on_page_markdown(markdown: str, page, config, files) -> str:
    if "<!-- ecamp:" not in markdown:
        return markdown

    def sub(m: re.Match) -> str:
        if m.group("what") == "cli":  # docs/_hooks/cli.py
            return m.group(0)
        return _render(m.group("what"), m.group("arg"))

    return _PLACEHOLDER.sub(sub, markdown)
