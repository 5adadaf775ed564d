"""The package's layout contract: the library (``ecamp`` minus ``ecamp/train/``) never needs ``ecamp.train`` nor
the ``[train]`` extra's ``transformers``/``tokenizers``, and the presets shipped in ``ecamp/train/presets`` are
found by name and parse."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import ecamp
from ecamp.errors import ConfigError

PACKAGE = Path(ecamp.__file__).resolve().parent
TRAIN = PACKAGE / "train"
LAZY_TRAIN_IMPORTS_ALLOWED = {PACKAGE / "cli.py"}  # `ecamp train ...` and `ecamp demo`, inside functions only

# Run first in the child: every import of a blocked module (or a submodule) raises ImportError, as if the package
# were not installed; the finder sits before the path finders, so nothing already importable gets through.
BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ModuleNotFoundError(f"{{name}} is blocked by the test", name=name)
        return None
sys.meta_path.insert(0, _Block())
"""

# load(local-dir) -> get_transform -> embed, with a check that embed matches the model on the transform's output.
EXERCISE = """
import numpy as np, torch
import ecamp
model = ecamp.load("local-dir:" + {folder!r})
tf = ecamp.get_transform(model)
rng = np.random.default_rng(0)
images = [rng.integers(0, 256, (80, 96), dtype=np.uint8), rng.integers(0, 256, (70, 70, 3), dtype=np.uint8)]
x = tf(images[0])
assert tuple(x.shape) == (3, 64, 64), x.shape
z = ecamp.embed(model, images, batch_size=2, progress=False)
assert z.shape == (2, 48) and np.isfinite(z).all(), z
with torch.no_grad():
    np.testing.assert_allclose(z[:1], model(x[None]).numpy(), rtol=1e-4, atol=1e-5)
"""


def run_blocked(blocked: tuple[str, ...], parts: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """Run the code ``parts`` (each dedented on its own) in a fresh interpreter where ``blocked`` cannot be imported."""
    script = tmp_path / "child.py"
    script.write_text("".join(textwrap.dedent(part) for part in [BLOCKER.format(blocked=blocked), *parts]))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path)
    assert out.returncode == 0, f"with {blocked} unimportable:\n{out.stdout}\n{out.stderr}"
    return out


def library_modules() -> list[str]:
    """Every module of ``ecamp`` outside ``ecamp/train/`` (``ecamp.__main__`` excepted: it runs the CLI)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(TRAIN) or path.name == "__main__.py":
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_library_modules_are_found():
    names = library_modules()
    assert {"ecamp", "ecamp.cli", "ecamp.factory", "ecamp.transforms", "ecamp.embedding", "ecamp.models"} <= set(names)
    assert not [n for n in names if n == "ecamp.train" or n.startswith("ecamp.train.")]


def test_library_works_with_ecamp_train_unimportable(tiny_folder, tmp_path):
    walk = f"""
    import importlib, pkgutil, sys
    import ecamp
    walked = sorted(m.name for m in pkgutil.walk_packages(ecamp.__path__, "ecamp.", onerror=lambda name: None))
    library = ["ecamp"] + [m for m in walked if not (m == "ecamp.train" or m.startswith("ecamp.train."))
                           and m != "ecamp.__main__"]
    expected = {library_modules()!r}
    assert set(library) == set(expected), (set(expected) - set(library), set(library) - set(expected))
    for name in library:
        importlib.import_module(name)
    """
    check = """
    leaked = sorted(m for m in sys.modules if m == "ecamp.train" or m.startswith("ecamp.train."))
    assert not leaked, leaked
    # the CLI's training commands say which extra to install instead of a traceback
    import contextlib, io
    from ecamp.cli import main
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(["train", "presets"])
    assert rc == 2 and "ecamp[train]" in err.getvalue(), (rc, err.getvalue())
    print("imported", len(library), "modules")
    """
    out = run_blocked(("ecamp.train",), [walk, EXERCISE.format(folder=str(tiny_folder)), check], tmp_path)
    assert "imported" in out.stdout


def _imports_of(source: str, module: str, *, is_package: bool = False) -> list[tuple[str, int, bool]]:
    """(absolute module, line, inside a function) for each import in the source of ``module``: ``import a.b``,
    ``from .x import y`` (as ``pkg.x`` and ``pkg.x.y``) and ``importlib.import_module("...")`` /
    ``__import__("...")`` with a constant name."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[str, int, bool]] = []

    def absolute(name: str | None, level: int, anchor: list[str]) -> str:
        if level == 0:
            return name or ""
        return ".".join([*anchor[: len(anchor) - level + 1], *([name] if name else [])])

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                mod = absolute(child.module, child.level, package)
                found.append((mod, child.lineno, in_function))
                found.extend((f"{mod}.{a.name}", child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.Call) and child.args and isinstance(child.args[0], ast.Constant):
                func = child.func
                fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                name = child.args[0].value
                if fname in ("import_module", "__import__") and isinstance(name, str):
                    anchor = package
                    if len(child.args) > 1 and isinstance(child.args[1], ast.Constant):
                        anchor = str(child.args[1].value).split(".")
                    level = len(name) - len(name.lstrip("."))
                    found.append((absolute(name.lstrip(".") or None, level, anchor), child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def _train_imports(source: str, module: str, *, is_package: bool = False) -> list[tuple[str, int, bool]]:
    return [(m, line, f) for m, line, f in _imports_of(source, module, is_package=is_package)
            if m == "ecamp.train" or m.startswith("ecamp.train.")]


def test_import_checker_sees_every_form():
    src = textwrap.dedent("""
        import ecamp.train.cli
        from ecamp import train
        from .. import train as t
        from ..train.presets import preset_path
        def f():
            from ..train import demo
            importlib.import_module("ecamp.train.cli")
            importlib.import_module("..train", "ecamp.models")
        from ..transforms import get_transform
        import ecamp.training_notes, ecamp.models
        from .train import x
    """)
    hits = _train_imports(src, "ecamp.models.probe")
    assert {(line, f) for _m, line, f in hits} == {(2, False), (3, False), (4, False), (5, False), (7, True),
                                                   (8, True), (9, True)}, hits
    assert _train_imports("from .train import demo\n", "ecamp", is_package=True) == [
        ("ecamp.train", 1, False), ("ecamp.train.demo", 1, False)]
    assert _train_imports("from .train import demo\n", "ecamp.cli") == [
        ("ecamp.train", 1, False), ("ecamp.train.demo", 1, False)]


def test_library_source_never_imports_ecamp_train():
    bad, allowed = [], []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.is_relative_to(TRAIN):
            continue
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        source = path.read_text(encoding="utf-8")
        for module, line, in_function in _train_imports(source, ".".join(parts), is_package=parts[-1] == "__init__"):
            where = f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
            (allowed if path in LAZY_TRAIN_IMPORTS_ALLOWED and in_function else bad).append(where)
    assert not bad, "the library must not import ecamp.train (only ecamp/cli.py, inside functions):\n" + "\n".join(bad)
    assert allowed, "ecamp/cli.py no longer delegates `ecamp train`? The checker found none of its lazy imports."


def _authors_checkpoint_code(path: Path) -> str:
    return f"""
    import argparse, json, torch
    from ecamp.models.encoder import build_encoder
    from ecamp.models.pretrain import ECAMPPretrainConfig, encoder_config
    cfg = ECAMPPretrainConfig.tiny()
    torch.manual_seed(1)
    vit = build_encoder(encoder_config(cfg, {{}})).state_dict()
    state = dict(vit)
    state["bert_encoder.model.bert.embeddings.word_embeddings.weight"] = torch.zeros(cfg.vocab_size,
                                                                                    cfg.text_hidden_size)
    state["decoder_embed.weight"] = torch.zeros(cfg.decoder_embed_dim, cfg.embed_dim)
    torch.save({{"model": state, "args": argparse.Namespace(epochs=1)}}, {str(path)!r})
    open({str(path.with_suffix(".json"))!r}, "w").write(json.dumps(cfg.to_dict()))
    """


def test_library_works_without_transformers_and_tokenizers(tiny_folder, tmp_path):
    parts = [EXERCISE.format(folder=str(tiny_folder))]
    if (PACKAGE / "convert.py").is_file():  # `ecamp convert` of an authors'-format checkpoint
        ckpt, out = tmp_path / "ECAMP_ViT_Base_16.pth", tmp_path / "converted"
        parts += [_authors_checkpoint_code(ckpt), f"""
    from ecamp.cli import main
    assert main(["convert", {str(ckpt)!r}, "--name", "cxr-vit-b", "--out", {str(out)!r},
                 "--config", {str(ckpt.with_suffix(".json"))!r}]) == 0
    converted = ecamp.load("local-dir:" + {str(out)!r})
    got = converted.state_dict()
    assert set(got) == set(vit) and all(torch.equal(got[k], vit[k]) for k in vit)
    """]
    parts.append("""
    import sys
    loaded = [m for m in sys.modules if m.split(".")[0] in ("transformers", "tokenizers")]
    assert not loaded, loaded
    print("ok")
    """)
    out = run_blocked(("transformers", "tokenizers"), parts, tmp_path)
    assert "ok" in out.stdout


# ---------------------------------------------------------------------------------------------------- presets


# what each lower layer may never import (at any depth of its source, functions included)
NEVER = {
    "ecamp.transforms": ("ecamp.factory", "ecamp.hub", "ecamp.registry", "ecamp.folders", "ecamp.cards"),
    "ecamp.io": ("ecamp.factory", "ecamp.hub", "ecamp.registry", "ecamp.folders", "ecamp.transforms"),
    "ecamp.registry": ("ecamp.io", "ecamp.transforms", "ecamp.factory", "ecamp.folders"),
    "ecamp.config": ("ecamp.registry", "ecamp.hub", "ecamp.factory", "ecamp.folders", "ecamp.models"),
    "ecamp.cards": ("ecamp.folders", "ecamp.factory", "ecamp.models"),
    "ecamp.hub": ("ecamp.folders", "ecamp.factory", "ecamp.cards", "ecamp.models"),
    "ecamp.models": ("ecamp.folders", "ecamp.factory", "ecamp.publish"),
}


@pytest.mark.parametrize("layer", sorted(NEVER))
def test_lower_layers_never_reach_up(layer):
    root = PACKAGE / layer.split(".", 1)[1]
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    for path in files:
        module = "ecamp." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        is_package = path.name == "__init__.py"
        if is_package:
            module = module.removesuffix(".__init__")
        for name, line, _ in _imports_of(path.read_text(), module, is_package=is_package):
            bad = [b for b in NEVER[layer] if name == b or name.startswith(b + ".")]
            assert not bad, f"{path}:{line} imports {name}"


def test_only_the_resolver_spells_the_name_prefixes():
    for path in PACKAGE.rglob("*.py"):
        if path.name != "factory.py" or path.parent != PACKAGE:
            text = path.read_text()
            assert '"hf-hub:"' not in text and '"local-dir:"' not in text, path


def test_presets_are_listed():
    from ecamp.train.presets import list_presets

    presets = list_presets()
    assert set(presets) == {"pretrain", "finetune"}
    assert {"mimic_cxr", "ffa_ir", "phantom_tiny"} <= set(presets["pretrain"])
    assert "cls_chexpert_10_linear-probe" in presets["finetune"]
    for kind, names in presets.items():
        assert names == sorted(names) and names, kind
        on_disk = sorted(p.stem for p in (TRAIN / "presets" / kind).glob("*.yaml"))
        assert names == on_disk, kind
    assert list_presets("pretrain") == {"pretrain": presets["pretrain"]}


def test_every_pretrain_preset_resolves_and_parses():
    from ecamp.train.presets import list_presets, preset_path
    from ecamp.train.pretrain.config import load_config

    for name in list_presets("pretrain")["pretrain"]:
        path = preset_path(name, "pretrain")
        assert path.is_file() and path.resolve().is_relative_to(TRAIN / "presets" / "pretrain"), path
        assert preset_path(f"{name}.yaml", "pretrain") == path
        assert preset_path(f"pretrain/{name}", "pretrain") == path
        assert preset_path(path, "pretrain") == path  # an existing file is itself
        load_config(path)


def test_every_finetune_preset_resolves_and_parses():
    from ecamp.train.downstream.recipes import load_preset
    from ecamp.train.presets import list_presets, preset_path

    for name in list_presets("finetune")["finetune"]:
        path = preset_path(name, "finetune")
        assert path.is_file() and path.resolve().is_relative_to(TRAIN / "presets" / "finetune"), path
        run, _recipe = load_preset(path)
        head, dataset, fraction, mode = name.split("_")  # e.g. cls_chexpert_10_linear-probe
        assert (run["head"], run["dataset"], str(run["fraction"]), run["mode"]) == (head, dataset, fraction, mode), \
            (name, run)


def test_unknown_preset_names_the_listing_command():
    from ecamp.train.presets import preset_path

    with pytest.raises(ConfigError, match="ecamp train presets"):
        preset_path("no_such_preset", "pretrain")
    with pytest.raises(ConfigError, match="ecamp train presets"):
        preset_path("mimic_cxr", "finetune")  # a preset of the other kind
    with pytest.raises(ConfigError, match="ecamp train presets"):
        preset_path("finetune/../pretrain/mimic_cxr", "pretrain")  # names are names, not paths into the package
    with pytest.raises(ConfigError):
        preset_path("mimic_cxr", "detection")


def test_presets_command_lists_them(tmp_path):
    from ecamp.train.presets import list_presets

    out = subprocess.run([sys.executable, "-m", "ecamp", "train", "presets"], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    missing = [n for names in list_presets().values() for n in names if n not in out.stdout]
    assert not missing, f"`ecamp train presets` does not list {missing}:\n{out.stdout}"


def test_wheel_package_data_covers_the_presets():
    """pyproject.toml ships ``pretrain/*.yaml`` and ``finetune/*.yaml`` of ``ecamp.train.presets`` (the wheel itself
    is built and installed by .ci/wheel_smoke.sh)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    pyproject = PACKAGE.parent / "pyproject.toml"
    if not pyproject.is_file():
        pytest.skip("not a checkout")
    data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
    globs = data["tool"]["setuptools"]["package-data"]["ecamp.train.presets"]
    for kind in ("pretrain", "finetune"):
        assert f"{kind}/*.yaml" in globs, globs
    core = " ".join(data["project"]["dependencies"])
    assert "transformers" not in core and "tokenizers" not in core, core
    train = " ".join(data["project"]["optional-dependencies"]["train"])
    assert "transformers" in train and "tokenizers" in train, train


def test_submodules_are_attributes_and_version_matches_pyproject():
    import tomllib

    code = ("import ecamp; print(ecamp.finetune.FrozenEncoder.__name__, ecamp.text.ReportEncoder.__name__, "
            "ecamp.convert.convert.__name__, ecamp.load_pretrain.__name__)")
    sub = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    assert sub.stdout.split() == ["FrozenEncoder", "ReportEncoder", "convert", "load_pretrain"]
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    assert project["version"] == ecamp.__version__


def test_every_error_is_also_a_builtin_and_the_base_is_never_raised_bare():
    import inspect

    import ecamp.errors as errors

    for name in errors.__all__:
        cls = getattr(errors, name)
        if cls is errors.EcampError:
            continue
        builtin = [b for b in inspect.getmro(cls) if b.__module__ == "builtins" and b not in (Exception, BaseException,
                                                                                              object)]
        assert builtin, f"{name} derives from no builtin error"
        err = cls("message", path="/some/file", repo_id="org/repo")
        assert (err.path, err.repo_id, str(err)) == ("/some/file", "org/repo", "message")
    bare = [f"{p.relative_to(PACKAGE.parent)}:{n}" for p in PACKAGE.rglob("*.py")
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if "raise EcampError(" in line]
    assert not bare, bare
