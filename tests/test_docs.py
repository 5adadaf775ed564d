"""The documentation: the site builds strictly, covers the API, the CLI and the config keys, and its code runs.

* ``mkdocs build --strict`` succeeds (mkdocs is in the dev extra: missing, it is a failure, not a skip);
* every name in the ``__all__`` of every public module is in the built API reference (``objects.inv``);
* every page of ``docs/`` is in the nav, and the README's relative links point at files that exist;
* every ``python`` and ``bash`` block of ``README.md``, ``CONTRIBUTING.md`` and ``docs/`` runs, unless the line
  right before it says why it cannot: ``<!-- not run: REASON -->`` (published weights, a GPU, a data set, a server)
  or ``<!-- slow: REASON -->`` (minutes of training; run by the slow test).

The blocks run in a scratch folder per page, in order, sharing one Python namespace per page (like a reader who
follows the page), with these stand-ins set up here:

* sample files named as the docs name them: ``study.dcm`` is the real chest radiograph RG1_UNCR of pydicom-data,
  ``view1_frontal.jpg``, ``b.png`` and ``export16.png`` are that film as 8-bit JPEG/PNG and 16-bit PNG, ``a.dcm``
  is pydicom's ``CT_small.dcm``, ``fundus.png`` is ``skimage.data.retina()``, ``films/`` holds four of them;
* ecamp's local store holds a small randomly initialised encoder (12 blocks of width 48, 64-px input) under the name
  ``cxr-vit-b``, where ``ecamp convert`` would put the authors' converted weights: blocks run the real loading path,
  with smaller shapes than the comments (which describe the real ViT-B/16);
* ``HF_HUB_OFFLINE=1``, so nothing reaches a network.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import types
import zlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
HOOKS = DOCS / "_hooks"
RUN_LANGS = {"python", "bash"}
DISPLAY_LANGS = {"text", "json", "yaml", "bibtex", "toml"}
DOCUMENTS = [REPO / "README.md", REPO / "CONTRIBUTING.md",
             *sorted(p for p in DOCS.rglob("*.md") if HOOKS not in p.parents)]

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARK = re.compile(r"^\s*<!--\s*(?P<kind>not run|slow)\s*:\s*(?P<reason>.*?)\s*-->\s*$")
_ANY_MARK = re.compile(r"^\s*<!--\s*(not run|slow|not-run|skip)\b", re.I)


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _hook(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_hook_{name}", HOOKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------------------------------
# code blocks


@dataclasses.dataclass
class Block:
    doc: str
    line: int
    lang: str
    code: str
    mark: str | None = None  # "not run" or "slow"
    reason: str = ""
    mark_line: str = ""

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, with the marker of the line right before each (blank lines skipped)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        end = re.compile(rf"^[ \t]*{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        j = i + 1
        while j < len(lines) and not end.match(lines[j]):
            j += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:j]]
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        before = lines[k] if k >= 0 else ""
        mark = _MARK.match(before)
        info = m.group("info").strip()
        out.append(Block(_rel(path), i + 1, info.split()[0].lower() if info else "", "\n".join(body) + "\n",
                         mark.group("kind") if mark else None, mark.group("reason") if mark else "",
                         before if _ANY_MARK.match(before) else ""))
        i = j + 1
    return out


ALL_BLOCKS = {_rel(p): code_blocks(p) for p in DOCUMENTS}


def test_every_code_block_has_a_language_and_every_marker_a_reason():
    problems = []
    for blocks in ALL_BLOCKS.values():
        for b in blocks:
            if b.lang not in RUN_LANGS | DISPLAY_LANGS:
                problems.append(f"{b.where}: language {b.lang!r}; use one of {sorted(RUN_LANGS | DISPLAY_LANGS)}")
            if b.mark_line and not b.mark:
                problems.append(f"{b.where}: malformed marker {b.mark_line.strip()!r}; write <!-- not run: why --> "
                                f"or <!-- slow: why -->")
            if b.mark and not b.reason:
                problems.append(f"{b.where}: <!-- {b.mark}: --> gives no reason")
            if b.mark and b.lang not in RUN_LANGS:
                problems.append(f"{b.where}: a {b.lang} block is never run; drop its marker")
    assert not problems, "\n".join(problems)


_DRIVER = r'''
import json, os, signal, subprocess, sys, time, traceback

plan = json.load(open(sys.argv[1]))
results = {}


def save():
    with open(sys.argv[2], "w") as f:
        json.dump(results, f)


def on_alarm(signum, frame):
    raise TimeoutError("the block ran past its time limit")


signal.signal(signal.SIGALRM, on_alarm)
for doc in plan:
    os.chdir(doc["workdir"])
    ns = {"__name__": "__main__"}
    done = results.setdefault(doc["doc"], {})
    for b in doc["blocks"]:
        print(f"\n----- {b['where']} ({b['lang']})", flush=True)
        signal.alarm(b["timeout"])
        start = time.monotonic()
        try:
            if b["lang"] == "python":
                exec(compile(b["code"], b["where"], "exec"), ns)
            else:
                r = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", b["code"]], timeout=b["timeout"])
                if r.returncode:
                    raise RuntimeError(f"the bash block exited with status {r.returncode}")
            done[b["where"]] = "ok"
        except BaseException:
            done[b["where"]] = traceback.format_exc()
            save()
            break  # the rest of this page builds on the block that failed
        finally:
            signal.alarm(0)
            print(f"----- {b['where']}: {time.monotonic() - start:.1f} s", flush=True)
        save()
save()
'''


def _write_samples(folder: Path) -> None:
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file
    from skimage.data import retina

    import ecamp

    film = Path(get_testdata_file("RG1_UNCR.dcm"))
    shutil.copy(film, folder / "study.dcm")
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "a.dcm")
    grey8 = (ecamp.io.read_image(film, policy="mimic-cxr-jpg") * 255).round().astype(np.uint8)
    Image.fromarray(grey8).save(folder / "view1_frontal.jpg", quality=95)
    Image.fromarray(grey8).save(folder / "b.png")
    grey16 = (ecamp.io.read_image(film, policy="bits") * 65535).round().astype(np.uint16)
    Image.fromarray(grey16).save(folder / "export16.png")
    Image.fromarray(retina()).save(folder / "fundus.png")
    (folder / "not-an-image.txt").write_text("not an image\n")
    films = folder / "films"
    films.mkdir()
    for name in ("study.dcm", "a.dcm", "view1_frontal.jpg", "b.png"):
        shutil.copy(folder / name, films / name)
    for name in ("examples", "tests", "scripts"):  # read by some blocks, as from a checkout
        (folder / name).symlink_to(REPO / name, target_is_directory=True)


def _write_store(ecamp_home: Path) -> None:
    """A small random encoder where ``ecamp convert ... --name cxr-vit-b`` puts the converted weights."""
    import timm
    import torch

    import ecamp

    from helpers.builders import TINY_ARGS

    entry = ecamp.registry.load_manifest().resolve("cxr-vit-b")
    cfg = ecamp.get_pretrained_cfg("cxr-vit-b")
    block = cfg.pop("ecamp")
    block.pop("source", None)
    cfg["input_size"] = [3, TINY_ARGS["img_size"], TINY_ARGS["img_size"]]
    for key in ("hf_hub_id", "tag"):
        cfg.pop(key, None)
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, pretrained_cfg=cfg, num_classes=0,
                              global_pool="avg", fc_norm=False, **{**TINY_ARGS, "depth": 12})
    model.ecamp_cfg = block
    ecamp.save_pretrained(model.eval(), ecamp_home / "local" / entry.name, name=entry.name)


@pytest.fixture(scope="module")
def doc_env(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The template folder of sample files and the environment the blocks run in."""
    root = tmp_path_factory.mktemp("docs-blocks")
    template = root / "template"
    template.mkdir()
    _write_samples(template)
    _write_store(root / "ecamp-home")
    env = dict(os.environ, ECAMP_HOME=str(root / "ecamp-home"), HF_HOME=str(root / "hf-home"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg", ECAMP_PROGRESS_INTERVAL="3600")
    env.pop("HF_HUB_CACHE", None)
    return template, env


def run_blocks(template: Path, env: dict[str, str], work: Path, kinds: set[str | None], timeout: int,
               docs: list[str] | None = None) -> tuple[dict[str, dict[str, str]], str]:
    """Run the blocks whose mark is in ``kinds`` (of ``docs``, default all), page by page in one process;
    ``(results, output)``."""
    plan = []
    for doc, blocks in ALL_BLOCKS.items():
        if docs is not None and doc not in docs:
            continue
        chosen = [b for b in blocks if b.lang in RUN_LANGS and b.mark in kinds]
        if not chosen:
            continue
        workdir = work / doc.replace("/", "__")
        shutil.copytree(template, workdir, symlinks=True)
        plan.append({"doc": doc, "workdir": str(workdir), "blocks": [
            {"where": b.where, "lang": b.lang, "code": b.code, "timeout": timeout} for b in chosen]})
    (work / "plan.json").write_text(json.dumps(plan))
    (work / "driver.py").write_text(_DRIVER)
    proc = subprocess.run([sys.executable, str(work / "driver.py"), str(work / "plan.json"),
                           str(work / "results.json")], env=env, cwd=work, capture_output=True, text=True,
                          timeout=timeout * 6)
    results = json.loads((work / "results.json").read_text()) if (work / "results.json").exists() else {}
    return results, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def block_results(doc_env, tmp_path_factory):
    template, env = doc_env
    return run_blocks(template, env, tmp_path_factory.mktemp("docs-run"), {None}, timeout=180)


def _check(doc: str, results: dict[str, dict[str, str]], output: str, kinds: set[str | None]) -> None:
    done = results.get(doc, {})
    problems = []
    for b in ALL_BLOCKS[doc]:
        if b.lang not in RUN_LANGS or b.mark not in kinds:
            continue
        status = done.get(b.where)
        if status is None:
            problems.append(f"{b.where}: did not run (an earlier block of the page failed, or the run timed out)")
        elif status != "ok":
            problems.append(f"{b.where} failed:\n{status}")
    if problems:
        start = output.find(f"----- {doc}:")
        tail = output[start:] if start >= 0 else output
        pytest.fail("\n".join(problems) + "\n\nOutput of the page's blocks:\n" + tail[-6000:])


RUN_DOCS = [doc for doc, blocks in ALL_BLOCKS.items() if any(b.lang in RUN_LANGS and not b.mark for b in blocks)]
SLOW_DOCS = [doc for doc, blocks in ALL_BLOCKS.items() if any(b.lang in RUN_LANGS and b.mark == "slow" for b in blocks)]


@pytest.mark.parametrize("doc", RUN_DOCS)
def test_code_blocks_run(doc, block_results):
    results, output = block_results
    _check(doc, results, output, {None})


@pytest.mark.slow
@pytest.mark.parametrize("doc", SLOW_DOCS)
def test_slow_code_blocks_run(doc, doc_env, tmp_path):
    template, env = doc_env
    results, output = run_blocks(template, env, tmp_path, {None, "slow"}, timeout=3600, docs=[doc])
    _check(doc, results, output, {None, "slow"})


def test_counts_of_blocks():
    """Most runnable blocks run; the marked ones are few and say why."""
    runnable = [b for blocks in ALL_BLOCKS.values() for b in blocks if b.lang in RUN_LANGS]
    unmarked = [b for b in runnable if not b.mark]
    assert len(unmarked) >= len(runnable) / 2, [b.where for b in runnable if b.mark]


# ------------------------------------------------------------------------------------------------------------------
# the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, "mkdocs build --strict failed:\n" + (proc.stdout + proc.stderr)[-8000:]
    return out


def test_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    assert (site / "objects.inv").is_file()


def _inventory(site: Path) -> dict[str, str]:
    """``{object path: page uri}`` from the objects inventory mkdocstrings writes."""
    data = (site / "objects.inv").read_bytes()
    header, _, body = data.partition(b"# The remainder of this file is compressed using zlib.\n")
    assert header.startswith(b"# Sphinx inventory version 2")
    out = {}
    for line in zlib.decompress(body).decode().splitlines():
        parts = line.split(" ")
        if len(parts) >= 4:
            out[parts[0]] = parts[3].split("#")[0]
    return out


def _has_all(path: Path) -> bool:
    return re.search(r"^__all__\s*[:=]", path.read_text(encoding="utf-8"), re.M) is not None


def public_modules() -> list[str]:
    """``ecamp``, the submodules it declares public, and every module of ``ecamp.train`` that declares ``__all__``."""
    import ecamp

    names = ["ecamp", *(f"ecamp.{m}" for m in ecamp._SUBMODULES)]
    names += [f"ecamp.{m}" for m in ("folders", "batching") if (REPO / "ecamp" / f"{m}.py").is_file()]
    for path in sorted((REPO / "ecamp" / "train").rglob("*.py")):
        if _has_all(path):
            parts = path.relative_to(REPO).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return list(dict.fromkeys(names))


def test_api_reference_has_every_public_name(site):
    inventory = _inventory(site)
    missing = []
    for name in public_modules():
        module = importlib.import_module(name)
        if name not in inventory:
            missing.append(f"{name}: no page documents the module (add one under docs/reference/api/ and the nav)")
            continue
        page = (site / inventory[name] / "index.html") if inventory[name] else site / "index.html"
        html = page.read_text(encoding="utf-8") if page.is_file() else ""
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            paths = {f"{name}.{attr}"}
            if isinstance(obj, types.ModuleType):
                paths.add(obj.__name__)
            elif getattr(obj, "__module__", None) and getattr(obj, "__qualname__", None):
                paths.add(f"{obj.__module__}.{obj.__qualname__}")
            if not paths & inventory.keys() and not re.search(rf"\b{re.escape(attr)}\b", html):
                missing.append(f"{name}.{attr}: not in the API reference (looked for {sorted(paths)})")
    assert not missing, "\n".join(missing)


def test_every_error_says_when_it_is_raised(site):
    import inspect

    import ecamp.errors

    inventory = _inventory(site)
    problems = []
    for name in ecamp.errors.__all__:
        doc = inspect.getdoc(getattr(ecamp.errors, name)) or ""
        if f"ecamp.errors.{name}" not in inventory:
            problems.append(f"{name}: not on the errors page")
        if name != "EcampError" and ("aised" not in doc or "What to do" not in doc):
            problems.append(f"{name}: the docstring must say when it is raised and what to do")
    assert not problems, "\n".join(problems)


def test_cli_reference_has_every_command(site):
    html = (site / "reference" / "cli" / "index.html").read_text(encoding="utf-8")
    commands = _hook("cli").commands()
    assert {"ecamp embed merge", "ecamp train finetune", "ecamp train sr-windows"} <= set(commands)
    missing = [c for c in commands if f'id="{c.replace(" ", "-")}"' not in html]
    assert not missing, f"no section for {missing}"
    from ecamp.train.cli import build_parser

    usage = build_parser().format_usage().split()[1:3]  # "ecamp train ..." as argparse writes it
    assert " ".join(usage) in html


def test_configuration_page_names_and_explains_every_key(site):
    from ecamp.config import EcampCfg
    from ecamp.train.downstream.recipes import Recipe
    from ecamp.train.pretrain.config import PretrainRunConfig

    html = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    reference = _hook("reference")
    assert reference.MISSING not in html, "a key has no meaning: add a comment on its line or an entry in MEANINGS"
    cfg = PretrainRunConfig()
    keys = [f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))]
    keys += [f.name for f in dataclasses.fields(Recipe)] + [f.name for f in dataclasses.fields(EcampCfg)]
    missing = [k for k in keys if f"<code>{k}</code>" not in html]
    assert not missing, f"not on the configuration page: {missing}"


def _nav_files(nav) -> list[str]:
    out = []
    if isinstance(nav, str):
        out.append(nav)
    elif isinstance(nav, list):
        for item in nav:
            out += _nav_files(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            out += _nav_files(value)
    return out


def test_every_page_is_in_the_nav():
    import yaml

    config = yaml.safe_load((REPO / "mkdocs.yml").read_text(encoding="utf-8"))
    assert config["docs_dir"] == "docs" and config.get("strict") is True
    nav = _nav_files(config["nav"])
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if HOOKS not in p.parents}
    assert not [p for p in nav if not (DOCS / p).is_file()], "the nav names missing pages"
    assert not sorted(pages - set(nav)), f"pages missing from the nav: {sorted(pages - set(nav))}"
    assert len(nav) == len(set(nav)), "a page is in the nav twice"


def test_readme_links_point_at_files():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (REPO / target.split("#")[0]).exists():
            broken.append(target)
    assert not broken, f"README links to missing files: {broken}"


def test_readme_keeps_the_setup_commands_and_stays_short():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    for line in ('pip install -e ".[dev]"', "python -m pytest", "ecamp demo"):
        assert re.search(rf"^{re.escape(line)}\s", text, re.M), line
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev]"' in ci and "python -m pytest" in ci
    assert len(text.splitlines()) <= 300


def test_contributing_names_every_module():
    text = (REPO / "CONTRIBUTING.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(REPO / "ecamp")) for p in sorted((REPO / "ecamp").rglob("*.py"))
               if f"`{p.relative_to(REPO / 'ecamp')}`" not in text]
    assert not missing, f"CONTRIBUTING.md's layout lacks {missing}"


def test_dev_extra_has_the_docs_tools():
    text = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    dev = re.search(r"^dev = \[(.*?)^\]", text, re.M | re.S)
    assert dev, "pyproject.toml has no dev extra"
    names = {re.split(r"[\[<>=!~ ]", d, maxsplit=1)[0] for d in re.findall(r'"([^"]+)"', dev.group(1))}
    assert {"mkdocs", "mkdocs-material", "mkdocstrings"} <= names
