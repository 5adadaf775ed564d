"""What a model folder says about itself: its manifest entry and its model card, for every folder kind.

Both are built from the folder's :class:`~ecamp.config.ModelConfig` and from the manifest entry the folder is, or
comes from (its ``ecamp.name`` or ``ecamp.derived_from``): that entry supplies what a folder cannot tell
(licence, provenance, training data, reported metrics); weights that differ from it get no aliases and no metrics.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import PRETRAIN_ARCHITECTURE, ModelConfig
from .errors import ManifestError, UnknownModelError
from .registry import ECAMP_BLOCK_FIELDS, PRETRAINED_CFG_FIELDS, ManifestLike, ModelEntry, load_manifest

__all__ = ["manifest_entry", "model_card", "notice_text", "credentialed_text", "NOTICE_NAME"]

logger = logging.getLogger("ecamp")

# Tags the Hub filters on, and the data sets ECAMP pre-trains on, per modality
_CARD_TAGS = {"cxr": ["chest-x-ray", "radiology"], "fundus": ["fundus", "ophthalmology"]}
_CARD_DATASETS = {"cxr": ["mimic-cxr"], "fundus": ["ffa-ir"]}
# The file a card's ``license_link`` names when the licence is "other" (the Hub links it from the repo page)
NOTICE_NAME = "NOTICE"
# The credentialed data each modality's reports come from, and its licence
_REPORTS = {"cxr": ("MIMIC-CXR 2.0.0 reports", "PhysioNet Credentialed Health Data License 1.5.0",
                    "https://physionet.org/content/mimic-cxr/view-license/2.0.0/"),
            "fundus": ("FFA-IR 1.0.0 reports", "PhysioNet Credentialed Health Data License 1.5.0",
                       "https://physionet.org/content/ffa-ir-medical-report/view-license/1.0.0/")}
# The Hub's pipeline tag of each folder kind
_PIPELINE = {"encoder": "image-feature-extraction", "classification": "image-classification",
             "segmentation": "image-segmentation", "detection": "object-detection",
             "pretrain": "image-feature-extraction"}


@dataclass(frozen=True)
class _Origin:
    """What a folder's weights are to the manifest entry it names: that entry's own weights (``"is"``); fine-tuned
    or otherwise changed from them (``"derives"``); trained anew by ``ecamp train`` with its recipe (``"recipe"``);
    or only a model of the same modality (``"family"``; ``entry`` None outside the ECAMP family)."""

    entry: ModelEntry | None
    relation: str
    name: str | None  # the folder's own manifest name, when it can have one


def _find_entry(name: object, manifests: Sequence[ManifestLike], kind: str = "encoder") -> ModelEntry | None:
    """The ``kind`` entry ``name`` resolves to in the first of ``manifests`` that knows it."""
    if not isinstance(name, str) or not name:
        return None
    for manifest in manifests:
        try:
            entry = load_manifest(manifest).resolve(name)
        except UnknownModelError:
            continue
        except ManifestError as e:  # a card or entry says less, but saving weights does not fail over it
            logger.warning("Not reading %s (the model card and manifest entry say less): %s",
                           manifest or "the manifest", e)
            continue
        if entry.kind == kind:
            return entry
    return None


def _modality_entry(modality: object, manifests: Sequence[ManifestLike], kind: str) -> ModelEntry | None:
    for manifest in manifests:
        with contextlib.suppress(ManifestError):
            for entry in load_manifest(manifest).models.values():
                if entry.kind == kind and entry.ecamp.get("modality") == modality:
                    return entry
    return None


def find_entry(name: object, kind: str = "encoder") -> ModelEntry | None:
    """The ``kind`` entry (``"encoder"`` or ``"pretrain"``) of the default manifest that ``name`` resolves to (None
    when there is none)."""
    return _find_entry(name, [None], kind)


def _origin(cfg: ModelConfig, manifest: ManifestLike = None) -> _Origin:
    block = cfg.ecamp
    kind = "pretrain" if cfg.kind == "pretrain" else "encoder"
    manifests = [manifest, None] if manifest is not None else [None]
    parent = _find_entry(block.derived_from, manifests, kind) or _find_entry(block.base_model, manifests, kind)
    named = _find_entry(block.name, manifests, kind)
    own_name = None if named is not None else block.name
    if parent is not None:
        return _Origin(parent, "derives", own_name)
    if named is not None:
        if cfg.kind == "pretrain":
            same_head = True
        else:
            same_head = not cfg.dense and (named.pretrained_cfg.get("num_classes") or 0) == cfg.num_classes
        trained = "checkpoint" in block.provenance  # what `ecamp train export` records
        if same_head:
            return _Origin(named, "recipe", None) if trained else _Origin(named, "is", named.name)
        return _Origin(named, "derives", None)
    return _Origin(_modality_entry(block.modality, manifests, kind), "family", own_name)


def _plain(value: Any) -> Any:
    """A JSON-ready deep copy of a manifest value (mappings and tuples of the parsed entry)."""
    return json.loads(json.dumps(value))


def _what(cfg: ModelConfig) -> str:
    if cfg.kind == "pretrain":
        return "A full ECAMP pre-training model (image encoder, decoder, SR head and report encoder)"
    if cfg.dense:
        head = (cfg.data.get("head") or {}).get("kind", "dense")
        return f"A {cfg.num_classes}-output {cfg.kind} model ({head} head on a frozen {cfg.architecture})"
    return f"A {cfg.num_classes}-class classifier" if cfg.num_classes else "An image encoder"


def _entry_pretrained_cfg(cfg: ModelConfig, base: ModelEntry | None) -> dict[str, Any]:
    if cfg.kind != "pretrain":
        pcfg = {k: v for k, v in cfg.pretrained_cfg.items() if k in PRETRAINED_CFG_FIELDS and v is not None}
        pcfg["num_classes"] = cfg.num_classes
        return pcfg
    # the pre-training model's input: the high-resolution film its SR target is cut from
    arch = cfg.data.get("ecamp_pretrain_config") or {}
    side = int(arch.get("img_size", 224)) * int(arch.get("sr_scale", 2))
    pcfg = dict(base.pretrained_cfg) if base is not None else {
        "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
        "mean": [float(cfg.ecamp.data.get("mean", 0.4721))] * 3, "std": [float(cfg.ecamp.data.get("std", 0.3037))] * 3}
    pcfg.update(input_size=[int(arch.get("in_chans", 3)), side, side], num_classes=0)
    return pcfg


def _entry(cfg: ModelConfig, origin: _Origin, *, name: str | None, hf_repo: str | None,
           files: Sequence[Mapping[str, Any]] = (), revision: str | None = None) -> dict[str, Any]:
    block = cfg.ecamp
    base = origin.entry
    pcfg = _entry_pretrained_cfg(cfg, base)
    if hf_repo and cfg.kind != "pretrain":
        pcfg["hf_hub_id"] = hf_repo
    what = _what(cfg)
    timm = cfg.timm or {}
    entry: dict[str, Any] = {
        "aliases": [], "kind": "pretrain" if cfg.kind == "pretrain" else "encoder",
        "description": block.description or (f"{what} ({cfg.architecture}) in timm format, exported by ecamp."
                                             if cfg.kind in ("encoder", "classification")
                                             else f"{what}, exported by ecamp."),
        "architecture": PRETRAIN_ARCHITECTURE if cfg.kind == "pretrain" else cfg.architecture,
        "model_args": _plain(timm.get("model_args") or {}),
        "hf_repo": hf_repo, "revision": revision, "published": revision is not None,
        "files": [dict(f) for f in files], "pretrained_cfg": _plain(pcfg),
        "ecamp": {k: v for k, v in block.to_dict().items() if k in ECAMP_BLOCK_FIELDS},
        "license": pcfg.get("license") or "other", "license_note": "", "provenance": {}, "training": {},
        "metrics": [],
    }
    if base is None:
        return entry
    prov = dict(base.provenance)
    derived_prov = {"paper": prov["paper"], "original_file": None, "original_url": None,
                    "conversion": "Saved by ecamp.save_pretrained as timm-format config.json and safetensors."
                    if cfg.kind in ("encoder", "classification") else
                    "Saved by ecamp.save_pretrained as config.json and safetensors.",
                    **({"code": prov["code"]} if prov.get("code") else {})}
    entry.update(license=base.license, license_note=base.license_note)
    if origin.relation == "is":
        entry.update(aliases=list(base.aliases) if name == base.name else [], description=base.description,
                     provenance=prov, training=dict(base.training), metrics=list(base.metrics))
    elif origin.relation == "derives":
        entry.update(description=block.description or f"{what} derived from {base.name} "
                                                       f"({base.description.rstrip('.')}).",
                     provenance={**derived_prov, "notes": f"Derived from {base.name} ({base.hf_repo})."},
                     training={"recipe": None, "data": base.training.get("data", ""),
                               "notes": f"The data {base.name} was pre-trained on; later training is not recorded."})
    elif origin.relation == "recipe":
        checkpoint = Path(str(block.provenance["checkpoint"])).name
        entry.update(description=block.description or f"{base.description.rstrip('.')}, trained anew with its "
                                                       f"recipe.",
                     provenance={**derived_prov, "conversion": f"Exported by `ecamp train export` from {checkpoint}."},
                     training=dict(base.training))
    else:
        modality = base.ecamp.get("modality")
        entry.update(description=block.description or f"{what} of the ECAMP family (modality {modality}); the "
                                                       f"manifest records no weights it derives from.",
                     provenance={**derived_prov, "notes": "No base weights are recorded for it."},
                     training={"recipe": None, "data": "not recorded"})
    return _plain(entry)


def manifest_entry(config: ModelConfig | Mapping[str, Any], *, name: str | None = None, hf_repo: str | None = None,
                   files: Sequence[Mapping[str, Any]] = (), revision: str | None = None,
                   manifest: ManifestLike = None) -> tuple[str | None, dict[str, Any]]:
    """The manifest name and entry (docs/manifest.md) of a folder whose ``config.json`` is ``config``;
    ``revision`` marks it published.

    Fields the folder cannot tell come from the manifest entry the folder names in its ``ecamp`` block (``name``,
    ``derived_from``, ``base_model``; looked up in ``manifest``, then ``$ECAMP_MANIFEST`` or the packaged one).
    ``name`` defaults to the folder's own manifest name (None when it has none).
    """
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    origin = _origin(cfg, manifest)
    name = name or origin.name
    return name, _entry(cfg, origin, name=name, hf_repo=hf_repo, files=files, revision=revision)


def credentialed_text(config: ModelConfig | Mapping[str, Any], files: Sequence[str] = ()
                      ) -> tuple[str, str, str] | None:
    """``(reports, licence, licence URL)`` when a folder holds a text side trained on credentialed reports (the full
    pre-training model's report encoder, or a ``tokenizer.json``), else None. ECAMP's reports are MIMIC-CXR's or
    FFA-IR's, both under PhysioNet's credentialed licence, which forbids sharing them (or what memorises them) with
    people who have not signed it."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    if cfg.kind != "pretrain" and "tokenizer.json" not in files:
        return None
    return _REPORTS.get(cfg.ecamp.modality or "cxr", _REPORTS["cxr"])


def notice_text(config: ModelConfig | Mapping[str, Any], *, manifest: ManifestLike = None) -> str | None:
    """The ``NOTICE`` file of a folder whose licence is ``"other"`` (None otherwise): the terms its card's
    ``license_link`` points to."""
    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    entry = _entry(cfg, _origin(cfg, manifest), name=None, hf_repo=None)
    if entry["license"] != "other":
        return None
    lines = ["Terms of use of these weights", "", entry["license_note"] or
             "No licence is recorded for these weights; ask their publisher before redistribution or commercial use.",
             ""]
    reports = credentialed_text(cfg)
    if reports is not None:
        lines += [f"This folder holds a text model trained on {reports[0]}, which are under the {reports[1]} "
                  f"({reports[2]}). Share it only with people bound by that licence (a gated or private repo).", ""]
    paper = (entry["provenance"].get("paper") or {})
    if paper.get("doi"):
        lines += [f"Paper: {paper['title']}, https://doi.org/{paper['doi']}", ""]
    return "\n".join(lines)


def _bibtex(paper: Mapping[str, Any]) -> str:
    key = re.sub(r"[^a-z0-9]", "", paper["title"].split()[0].lower()) + str(paper.get("year") or "")
    fields = [("title", paper["title"]), ("journal", paper.get("venue")), ("year", paper.get("year")),
              ("doi", paper.get("doi")), ("eprint", paper.get("arxiv")),
              ("archiveprefix", "arXiv" if paper.get("arxiv") else None)]
    body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields if v)
    return f"@{'article' if paper.get('venue') else 'misc'}{{{key},\n{body}\n}}"


def _use(cfg: ModelConfig, repo: str) -> list[str]:
    """The card's "Use" section: how this kind of folder is loaded and run."""
    if cfg.kind == "pretrain":
        return ["```python", "import ecamp", "", f'model = ecamp.load_pretrain("hf-hub:{repo}")  # needs ecamp[train]',
                "encoder = model.encoder  # the image encoder inside it", "```", ""]
    if cfg.dense:
        out = "masks/" if cfg.kind == "segmentation" else "boxes.json"
        return ["```python", "import ecamp", "", f'model = ecamp.load("hf-hub:{repo}")',
                'results = ecamp.predict.predict(model, ["film.dcm"])', "```", "",
                f"Command line: `ecamp predict --model hf-hub:{repo} films/ --out {out}`.", ""]
    n = cfg.num_classes
    out = "logits" if n else "embedding"
    return ["```python", "import ecamp", "", f'model = ecamp.load("hf-hub:{repo}")', "tf = ecamp.get_transform(model)",
            f'{out} = model(tf("image.png")[None])  # [1, {n or cfg.data.get("num_features", 768)}]', "```", "",
            f'Without ecamp: `timm.create_model("hf-hub:{repo}", pretrained=True)` builds the same model.', ""]


def _scope(cfg: ModelConfig) -> list[str]:
    """The card's intended use, out-of-scope use and limitations."""
    if cfg.kind == "pretrain":
        intended = ("continued pre-training and research on ECAMP's method (`ecamp train pretrain --init-from`); "
                    "its image encoder (`model.encoder`) for features and fine-tuning; where a sentence's words "
                    "lie on a film (`ecamp explain FILE --text ...`) and, experimentally, finding scores from the "
                    "masked-language likelihood of a finding's words given the film (they rank films for one "
                    "finding; they are not probabilities)")
    elif cfg.dense:
        intended = f"research on {cfg.kind} of the findings it was fine-tuned for, on images like its training data"
    elif cfg.num_classes:
        intended = "research on classifying the findings it was fine-tuned for, on images like its training data"
    else:
        intended = "research: image features for linear probes, retrieval among images, and fine-tuning"
    modality = {"cxr": "chest radiographs", "fundus": "fundus angiography images"}.get(cfg.ecamp.modality or "",
                                                                                        "the images it was trained on")
    out = ["diagnosis, triage or any clinical decision about a patient (it is not a medical device)",
           f"images other than {modality} (other modalities, views or body parts) without validation",
           "populations, scanners and hospitals unlike its training data without re-validation"]
    if cfg.kind == "pretrain":
        out.append("report generation, image-text retrieval or zero-shot classification: the text side is a "
                   "masked-language model with no contrastive head")
    limits = [f"trained on {modality} from a small number of institutions; its biases carry over",
              "the preprocessing (intensity policy, size, normalisation; see below) must match, or outputs drift",
              "no calibration or uncertainty estimate is provided"]
    if cfg.kind == "pretrain":
        limits.append("its text side was trained on credentialed reports: share it only with people bound by their "
                      "licence (see Licence)")
    return ["## Intended use", "", f"- {intended}", "", "## Out-of-scope use", "", *(f"- {v}" for v in out), "",
            "## Limitations", "", *(f"- {v}" for v in limits), ""]


def model_card(config: ModelConfig | Mapping[str, Any], *, name: str | None = None, hf_repo: str | None = None,
               manifest: ManifestLike = None):
    """The ``huggingface_hub.ModelCard`` of a folder of any kind: metadata for the Hub, then use, preprocessing,
    training data, results, provenance, licence and citation."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg = config if isinstance(config, ModelConfig) else ModelConfig.from_dict(config)
    origin = _origin(cfg, manifest)
    entry = _entry(cfg, origin, name=origin.name, hf_repo=hf_repo)
    block = cfg.ecamp
    modality = block.modality
    task = _PIPELINE[cfg.kind]
    base = origin.entry
    lic = entry["license"]
    data = ModelCardData(
        library_name="timm" if cfg.kind in ("encoder", "classification") else "ecamp", license=lic,
        license_name="see-model-card" if lic == "other" else None,
        license_link=NOTICE_NAME if lic == "other" else None,
        pipeline_tag=task, tags=["timm", task, "ecamp", "medical", *_CARD_TAGS.get(modality, [])]
        if cfg.kind in ("encoder", "classification") else [task, "ecamp", "medical", *_CARD_TAGS.get(modality, [])],
        datasets=_CARD_DATASETS.get(modality) if base is not None and origin.relation != "family" else None,
        # the Hub refuses a base_model that is not an existing repo, so only a published base is named
        base_model=base.hf_repo if base is not None and origin.relation == "derives" and base.published else None,
        metrics=sorted({m["metric"] for m in entry["metrics"]}) or None,
    )
    repo = hf_repo or "<org>/<repo>"
    title = name or block.name or hf_repo or entry["architecture"]
    lines = [f"# {title}", "", entry["description"], "",
             "Research use only; not a medical device and not validated for clinical decisions.", ""]
    if cfg.kind == "pretrain":
        lines += ["ECAMP's text side is a masked-language model (a BERT report encoder trained to fill in masked "
                  "entities and descriptors, with the image as context); it has no contrastive head. It gives no "
                  "image-text similarity, no retrieval and no zero-shot classification.", ""]
    lines += ["## Use", "", *_use(cfg, repo), *_scope(cfg)]
    if cfg.label_names:
        lines += [f"Classes, in output order: {', '.join(cfg.label_names)}.", ""]
    pcfg = entry["pretrained_cfg"]
    lines += ["## Preprocessing", ""]
    if cfg.dense:
        dense = block.dense_input
        lines.append(f"- the whole image resized to {pcfg['input_size'][1:]} ({dense.resize if dense else 'bilinear'}"
                     f"{', colour' if dense and dense.rgb else ', grey'}), no crop")
    else:
        lines.append(f"- input size {pcfg['input_size']}, interpolation {pcfg.get('interpolation')}, "
                     f"crop_pct {pcfg.get('crop_pct')} ({pcfg.get('crop_mode', 'center')} crop)")
    lines += [f"- mean {pcfg['mean']}, std {pcfg['std']}",
              f"- modality: {modality or 'not recorded'}; image policy: "
              f"{block.image_policy if 'image_policy' in block.keys else 'not recorded'}"
              + ("; grey converted to 3 channels" if block.grayscale else ""), ""]
    training = entry["training"]
    if training:
        lines += ["## Training data", "", f"- {training['data']}"]
        if training.get("recipe"):
            lines.append(f"- recipe: `ecamp train pretrain --config {training['recipe'].split('/')[-1]}`")
        if training.get("notes"):
            lines.append(f"- {training['notes']}")
        lines.append("")
    if block.finetune:
        done = ", ".join(f"{k} {v}" for k, v in block.finetune.items() if isinstance(v, (str, int, float)))
        lines += ["## Fine-tuning", "", f"- started from {block.base_model or 'not recorded'}; {done}", ""]
    if entry["metrics"]:
        lines += ["## Results", "", "| task | metric | value | split | source |", "|---|---|---|---|---|"]
        lines += [f"| {m['task']} | {m['metric']} | {m['value']} | {m.get('split', '')} | {m['source']} |"
                  for m in entry["metrics"]]
        lines.append("")
    prov = entry["provenance"]
    paper = prov.get("paper") or {}
    if prov:
        lines += ["## Provenance", ""]
        if paper:
            links = [f"https://doi.org/{paper['doi']}"] + ([f"https://arxiv.org/abs/{paper['arxiv']}"]
                                                          if paper.get("arxiv") else [])
            lines.append(f"- paper: {paper['title']} (doi:{paper['doi']}; {', '.join(links)})")
        for key in ("original_file", "original_url", "conversion", "code", "code_commit", "notes"):
            if prov.get(key):
                lines.append(f"- {key.replace('_', ' ')}: {prov[key]}")
        lines.append("")
    if entry["license_note"] or lic == "other":
        lines += ["## Licence", "", entry["license_note"] or "No licence is recorded for these weights."]
        if lic == "other":
            lines.append(f"The terms are also in the [{NOTICE_NAME}]({NOTICE_NAME}) file beside the weights.")
        lines.append("")
    if paper:
        lines += ["## Citation", "", "```bibtex", _bibtex(paper), "```", ""]
    order = ["library_name", "license", "license_name", "license_link", "pipeline_tag", "tags", "datasets",
             "base_model", "metrics"]
    return ModelCard(f"---\n{data.to_yaml(original_order=order)}\n---\n\n" + "\n".join(lines))
