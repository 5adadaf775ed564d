"""Hostile and careless inputs to every command: each ends in a correct result or a typed one-line error raised
before the work it makes useless, never a traceback, a hang, a silent wrong answer or a half-written file."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ecamp
from ecamp.cli import main
from ecamp.embedding import embed_files, merge_embeddings
from ecamp.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    EcampError,
    InvalidArgumentError,
    InvalidWeightsFileError,
    ManifestError,
    WeightsMismatchError,
)

from helpers.builders import make_tiny_encoder
from helpers.loopback_hub import WRITE_TOKEN


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (72, 80), dtype=np.uint8)).save(folder / f"i{i}.png")
    return sorted(str(p) for p in folder.iterdir())


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory) -> Path:
    model = make_tiny_encoder()
    model.reset_classifier(3)
    model.ecamp_cfg = model.ecamp_cfg.replace(task="classification", activation="sigmoid")
    folder = tmp_path_factory.mktemp("classifier")
    ecamp.save_pretrained(model, folder, label_names=["a", "b", "c"])
    return folder


def _edited(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    cfg = json.loads((dest / "config.json").read_text())
    edit(cfg)
    (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def _one_line(err: BaseException, limit: int = 600) -> str:
    text = str(err)
    assert "\n" not in text and len(text) < limit and "\x00" not in text, text[:300]
    return text


# -- a folder's config.json and its weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("edit, error, match", [
    (lambda c: c.update(num_classes=5, label_names=[]), WeightsMismatchError,
     r"num_classes 5 .*head\.weight of shape \[3, 48\]"),
    (lambda c: c.update(num_classes=0, label_names=[]), WeightsMismatchError,
     r"num_classes 0 .*head\.weight of shape \[3, 48\]"),
    (lambda c: c.update(label_names=["a", "b"]), InvalidWeightsFileError, r"2 label_names for num_classes 3"),
    (lambda c: c.update(label_names="abc"), InvalidWeightsFileError, r"label_names 'abc'"),
    (lambda c: c.update(num_classes=2.5), InvalidWeightsFileError, r"num_classes 2\.5 is not a count"),
], ids=["more-classes", "no-classes", "too-few-names", "names-not-a-list", "float-classes"])
def test_a_classifier_whose_config_disagrees_with_its_weights_is_not_loaded(classifier_folder, tmp_path, edit, error,
                                                                             match):
    folder = _edited(classifier_folder, tmp_path / "edited", edit)
    with pytest.raises(error, match=match) as err:
        ecamp.load(f"local-dir:{folder}")
    _one_line(err.value)
    # an encoder without a head stays loadable, and num_classes= still replaces a head on purpose
    assert ecamp.load(f"local-dir:{classifier_folder}", num_classes=5).num_classes == 5


# -- embedding chunks and their run's state ---------------------------------------------------------------------------
def _sharded(model, images, out: Path) -> None:
    for k in range(2):
        assert not embed_files(model, images, out, chunk_size=2, shard=(k, 2), progress=False).complete


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _fewer_rows(p: Path) -> None:
    z = dict(np.load(p))
    z["rows"] = z["rows"][:1]
    with open(p, "wb") as f:
        np.savez(f, **z)


@pytest.mark.parametrize("spoil", ["other-run", "fewer-rows", "truncated", "random-bytes"])
def test_a_chunk_that_is_not_this_runs_is_named_never_merged_and_redone(tiny_folder, images, tmp_path, spoil):
    model = ecamp.load(f"local-dir:{tiny_folder}")
    reference = tmp_path / "ref.npy"
    embed_files(model, images, reference, chunk_size=2, progress=False)
    out = tmp_path / "e.npy"
    _sharded(model, images, out)
    chunk = tmp_path / "e.npy.partial" / "chunk-000001.npz"
    if spoil == "other-run":  # the same position of a run with other weights
        other = tmp_path / "other.npy"
        embed_files(make_tiny_encoder(seed=1), images, other, chunk_size=2, shard=(1, 2), progress=False)
        shutil.copy(tmp_path / "other.npy.partial" / chunk.name, chunk)
    else:
        {"fewer-rows": _fewer_rows, "truncated": _truncate,
         "random-bytes": lambda p: p.write_bytes(os.urandom(400))}[spoil](chunk)
    with pytest.raises(CheckpointError, match=r"chunk 1 ") as err:
        merge_embeddings(out)
    _one_line(err.value)
    assert not out.exists() and not chunk.exists()  # removed, so that its shard redoes it
    embed_files(model, images, out, chunk_size=2, shard=(1, 2), progress=False)
    merge_embeddings(out)
    np.testing.assert_allclose(np.load(out), np.load(reference), atol=1e-5)
    # a run alone resumes over a spoiled chunk: it is embedded again, the rest is kept
    _sharded(model, images, out)
    _truncate(chunk)
    result = embed_files(model, images, out, chunk_size=2, progress=False)
    assert result.complete and result.resumed_chunks == 2
    np.testing.assert_allclose(np.load(out), np.load(reference), atol=1e-5)


@pytest.mark.parametrize("spoil", [
    lambda s, f: "{not json",
    lambda s, f: {k: v for k, v in s.items() if k != "chunk_size"},
    lambda s, f: {**s, "chunk_size": 0},
    lambda s, f: {**s, "n": 5.0},
    lambda s, f: {**s, "n": 10 ** 12},
    lambda s, f: s,  # with files.json disagreeing
], ids=["not-json", "no-chunk-size", "chunk-size-0", "n-float", "n-huge", "files-disagree"])
def test_a_corrupt_run_state_is_refused_by_merge_and_started_over_alone(tiny_folder, images, tmp_path, spoil):
    model = ecamp.load(f"local-dir:{tiny_folder}")
    out = tmp_path / "e.npy"
    _sharded(model, images, out)
    partial = tmp_path / "e.npy.partial"
    state, files = (json.loads((partial / n).read_text()) for n in ("state.json", "files.json"))
    new = spoil(state, files)
    (partial / "state.json").write_text(new if isinstance(new, str) else json.dumps(new))
    if new is state:
        (partial / "files.json").write_text(json.dumps(files[:3]))
    with pytest.raises(CheckpointError, match="delete the folder") as err:
        merge_embeddings(out)
    _one_line(err.value)
    assert embed_files(model, images, out, chunk_size=2, progress=False).resumed_chunks == 0  # started over
    assert np.load(out).shape == (5, 48)


# -- non-finite outputs -----------------------------------------------------------------------------------------------
def test_non_finite_embeddings_are_failures_and_a_zero_std_is_refused(tiny_folder, images, tmp_path):
    zero = _edited(tiny_folder, tmp_path / "zero", lambda c: c["pretrained_cfg"].update(std=[0.0, 0.0, 0.0]))
    with pytest.raises(ConfigError, match=r"pretrained_cfg\.std \[0\.0, 0\.0, 0\.0\]"):
        ecamp.load(f"local-dir:{zero}")
    model = ecamp.load(f"local-dir:{tiny_folder}")
    with torch.no_grad():  # a model whose output overflows on some inputs
        model.head = torch.nn.Identity()
        model.norm.weight.fill_(1e38)
        model.norm.bias.fill_(1e38)
    with pytest.raises(DataError, match="None of the 5 files"):
        embed_files(model, images, tmp_path / "x.npy", chunk_size=2, progress=False)
    with pytest.raises(DataError, match="NaN or infinity"):
        ecamp.embed(model, images, progress=False)
    assert not (tmp_path / "x.npy").exists()


# -- output places ----------------------------------------------------------------------------------------------------
def test_every_output_place_is_checked_before_any_work(tiny_folder, classifier_folder, images, tmp_path, monkeypatch,
                                                       hub):
    from ecamp import publish
    from ecamp.explain import save_overlay
    from ecamp.predict import predict_files

    model = ecamp.load(f"local-dir:{tiny_folder}")
    clf = ecamp.load(f"local-dir:{classifier_folder}")

    def no_work(*args, **kwargs):
        raise AssertionError("the model ran before the output place was checked")

    monkeypatch.setattr(model, "forward", no_work)
    monkeypatch.setattr(clf, "forward", no_work)
    (tmp_path / "folder.npy").mkdir()
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "theirs.csv").write_text("patient,age\n1,40\n")
    for call, match in [
        (lambda: embed_files(model, images, tmp_path / "missing" / "x.npy"), "does not exist"),
        (lambda: embed_files(model, images, tmp_path / "folder.npy"), "is a folder"),
        (lambda: predict_files(clf, images, tmp_path / "missing" / "p.csv"), "does not exist"),
        (lambda: predict_files(clf, images, tmp_path / "theirs.csv"), "not an earlier prediction"),
        (lambda: save_overlay(model, images[0], tmp_path / "folder.png"), "is a folder"),
        (lambda: ecamp.push(tiny_folder, "ecamp-hostile/out", token=WRITE_TOKEN, manifest=tmp_path / "folder.npy"),
         "is a folder"),
    ]:
        with pytest.raises(InvalidArgumentError, match=match) as err:
            call()
        _one_line(err.value)
    assert (tmp_path / "theirs.csv").read_text() == "patient,age\n1,40\n"
    assert "ecamp-hostile/out" not in hub.repos
    # a manifest that cannot be written after the upload: the commit is named, with how to record it
    manifest, real = tmp_path / "m.json", publish.atomic_write

    def full_disk(path, writer):
        if Path(path) == manifest:
            raise OSError(28, "No space left on device")
        real(path, writer)

    monkeypatch.setattr(publish, "atomic_write", full_disk)
    folder = tmp_path / "folder"
    shutil.copytree(tiny_folder, folder)
    with pytest.raises(ManifestError, match=r"as commit [0-9a-f]{40}.*record it by running the same push") as err:
        ecamp.push(folder, "ecamp-hostile/full", token=WRITE_TOKEN, manifest=manifest)
    assert hub.repos["ecamp-hostile/full"].refs["main"] in _one_line(err.value)


def test_what_a_killed_atomic_write_left_is_removed_by_the_next_run(tmp_path):
    from ecamp.outputs import remove_stale_temporaries

    out = tmp_path / "masks"
    dead, alive = tmp_path / ".masks.tmp-999999999-ab12", tmp_path / f".masks.tmp-{os.getpid()}-cd34"
    other = tmp_path / ".other.tmp-999999999-ab12"
    for d in (dead, alive, other):
        d.mkdir()
    (tmp_path / ".masks.old-999999998-ef56").write_text("x")
    remove_stale_temporaries(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name])


# -- resource bombs ---------------------------------------------------------------------------------------------------
def _alias_bomb(levels: int = 8) -> str:
    def level(i: int) -> str:
        return "&a0 [" + ",".join(["1"] * 9) + "]" if i == 0 else \
            f"&a{i} [" + level(i - 1) + f", *a{i - 1}" * 8 + "]"
    return level(levels)  # a few hundred bytes, 9^9 values once expanded


def test_resource_bombs_are_refused_before_anything_is_built(tiny_folder, tmp_path, monkeypatch):
    from ecamp.convert import convert, read_checkpoint
    from ecamp.models.pretrain import ECAMPPretrainConfig
    from ecamp.schema import from_mapping, load_yaml

    bomb = f"img_size: {_alias_bomb()}\n"
    assert len(bomb) < 600
    with pytest.raises(ConfigError, match="ECAMP_MAX_CONFIG_NODES") as err:
        from_mapping(ECAMPPretrainConfig, load_yaml(bomb, loader=None, source="bomb.yaml"), source="bomb.yaml")
    _one_line(err.value)
    with pytest.raises(ConfigError, match="ECAMP_MAX_CONFIG_DEPTH"):
        load_yaml("a: " + "[" * 100_000 + "]" * 100_000, source="deep.yaml")
    with pytest.raises(ConfigError, match="ECAMP_MAX_CONFIG_NODES"):  # built in Python, no YAML involved
        shared: list = [1] * 9
        for _ in range(8):
            shared = [shared] * 9
        from_mapping(ECAMPPretrainConfig, {"img_size": shared}, source="built")
    monkeypatch.setenv("ECAMP_MAX_CONFIG_DEPTH", "200")  # a user with a deeper document raises the bound
    assert load_yaml("a: " + "[" * 150 + "]" * 150, source="deeper.yaml")["a"]
    # config.json nested 100,000 deep
    deep = tmp_path / "deep"
    shutil.copytree(tiny_folder, deep)
    (deep / "config.json").write_text('{"architecture": "vit_base_patch16_224", "x": ' + "[" * 100_000
                                      + "]" * 100_000 + "}")
    with pytest.raises(InvalidWeightsFileError):
        ecamp.load(f"local-dir:{deep}")
    # a .pth of a few kB that inflates a thousandfold (the inflated to 2-8 GiB)
    pth = tmp_path / "bomb.pth"
    with zipfile.ZipFile(pth, "w", compression=zipfile.ZIP_DEFLATED) as z, \
            z.open("archive/data.pkl", "w", force_zip64=True) as f:
        for _ in range(4):
            f.write(bytes(1 << 24))
    assert pth.stat().st_size < 1e6
    with pytest.raises(InvalidWeightsFileError, match="inflates") as err:
        read_checkpoint(pth)
    _one_line(err.value)
    # convert --config sizes and an input size the model cannot take
    real = tmp_path / "real.pth"
    torch.save({"model": {"x": torch.zeros(1)}}, real)
    for sizes, match in [({"embed_dim": 1_000_000, "num_heads": 1}, "embed_dim"), ({"depth": -3}, "depth"),
                         ({"embed_dim": 100, "num_heads": 12}, "does not divide"), ({"depth": "12"}, "depth"),
                         ({"mask_ratio": math.nan}, "mask_ratio")]:
        (tmp_path / "c.json").write_text(json.dumps(sizes))
        with pytest.raises(InvalidArgumentError, match=match) as err:
            convert(real, "cxr-vit-b", out=tmp_path / "out", config=tmp_path / "c.json")
        _one_line(err.value)
    assert not (tmp_path / "out").exists()
    for cfg, match in [([3, 100_000, 100_000], "input_size"), ([3, 0, 0], "input_size"), ([3, 96, 96], "input_size")]:
        folder = _edited(tiny_folder, tmp_path / f"in{cfg[1]}", lambda c, cfg=cfg: c["pretrained_cfg"].update(
            input_size=cfg))
        with pytest.raises(ConfigError, match=match):
            ecamp.load(f"local-dir:{folder}")


def test_a_pickled_checkpoint_is_refused_without_torchs_unsafe_advice(tmp_path, capsys):
    torch.save({"model": {"x": torch.zeros(1)}, "args": zipfile.ZipInfo("x")}, tmp_path / "pickled.pth")
    assert main(["convert", str(tmp_path / "pickled.pth"), "--name", "cxr-vit-b", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "pickled Python objects" in err and "do not load an untrusted file with weights_only=False" in err
    assert "will likely succeed" not in err and not (tmp_path / "o").exists()


# -- lists ------------------------------------------------------------------------------------------------------------
def test_lists_refuse_what_would_train_on_wrong_data(tmp_path):
    from ecamp.train.common.lists import check_paths, read_label_list, read_table

    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(b"x")
    (tmp_path / "outside.png").write_bytes(b"x")
    cases = {
        "not-utf8.txt": (b"a.png 1\n\xff\xfe.png 0\n", r"not-utf8\.txt:2: byte 0xff is not UTF-8"),
        "inf.txt": (b"a.png inf\n", "finite"), "nan.txt": (b"a.png nan\n", "finite"),
        "huge.txt": (b"a.png 1e308\n", "finite"),
        "long.txt": (b"a.png " + b"x" * 2_000_000 + b"\n", r"\(2000006 characters\)"),
    }
    for name, (data, match) in cases.items():
        (root / name).write_bytes(data)
        with pytest.raises(DataError, match=match) as err:
            read_label_list(root / name, 1, True)
        assert len(str(err.value)) < 2000
    (root / "box.csv").write_text('image_path,bbox\na.png,"' + "1" * 131_073 + '"\n')
    with pytest.raises(DataError, match=r"box\.csv:\d+: not a CSV record"):
        read_table(root / "box.csv", ["image_path", "bbox"])
    from ecamp.train.downstream.detection import read_box_list

    for box in ("[[10,10,5,20]]", "[[1,2,3,4],[-5,0,3,3]]", "[[1,1,1e9,3]]"):  # inverted, negative, far outside
        (root / "boxes.csv").write_text(f'image_path,bbox\na.png,"[[0,0,0,0]]"\nb.png,"{box}"\n')
        with pytest.raises(DataError, match=r"boxes\.csv:3: box .* is not x1 <= x2"):
            read_box_list(root / "boxes.csv")
    for name in ("../outside.png", "../../../../etc/hostname", "/etc/hostname", str(tmp_path / "outside.png"),
                 "a\x00b.png"):
        (root / "l.txt").write_text("x 1\n")
        with pytest.raises(DataError, match="not a path inside the data folder") as err:
            check_paths({root / "l.txt": [name]}, root)
        assert "\x00" not in str(err.value)
    check_paths({root / "l.txt": ["./a.png"]}, root)  # inside, however it is spelt


# -- arguments --------------------------------------------------------------------------------------------------------
def test_bad_arguments_are_usage_errors_or_typed_errors(tiny_folder, classifier_folder, images, tmp_path, capsys):
    from ecamp.explain import explain

    model = f"local-dir:{tiny_folder}"
    for argv in (["embed", images[0], "--model", model, "--out", "x.npy", "--chunk-size", "0"],
                 ["embed", images[0], "--model", model, "--out", "x.npy", "--chunk-size", "-3"],
                 ["embed", images[0], "--model", model, "--out", "x.npy", "--batch-size", "0"],
                 ["embed", images[0], "--model", model, "--out", "x.npy", "--num-workers", "-1"],
                 ["predict", images[0], "--model", model, "--out", "x.csv", "--num-workers", "-1"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and "Traceback" not in capsys.readouterr().err
    loaded = ecamp.load(model)
    for kwargs in ({"chunk_size": 0}, {"batch_size": 0}, {"num_workers": -1}, {"chunk_size": 1.5}):
        with pytest.raises(InvalidArgumentError, match="must be an integer"):
            embed_files(loaded, images, tmp_path / "x.npy", **kwargs)
    with pytest.raises(InvalidArgumentError, match="Unknown target"):
        explain(ecamp.load(f"local-dir:{classifier_folder}"), images[0], target="²")
    for edit, match in [(lambda c: c["model_args"].update(num_heads=5), "does not divide"),
                        (lambda c: c["pretrained_cfg"].update(mean="abc"), r"pretrained_cfg\.mean")]:
        folder = _edited(tiny_folder, tmp_path / f"f{len(list(tmp_path.iterdir()))}", edit)
        with pytest.raises(ConfigError, match=match):
            ecamp.load(f"local-dir:{folder}")


# -- fuzz over the config schema --------------------------------------------------------------------------------------
def _random_value(rng: random.Random, depth: int = 0):
    kinds = ["int", "float", "str", "bool", "none", "list", "dict", "special"]
    kind = rng.choice(kinds if depth < 4 else kinds[:5] + ["special"])
    if kind == "int":
        return rng.choice([0, 1, -1, 3, 2 ** 63, -(2 ** 70), 10 ** 12, rng.randint(-100, 10 ** 6)])
    if kind == "float":
        return rng.choice([math.nan, math.inf, -math.inf, 0.0, -0.5, 1e308, 1e-320, rng.uniform(-10, 10)])
    if kind == "str":
        return rng.choice(["", "x", "²", "\x00", "a" * 5000, "sigmoid", "cxr", "../../etc"])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "none":
        return None
    if kind == "list":
        return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if kind == "dict":
        return {rng.choice(["a", "img_size", "task", "seed", "1"]): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}
    deep: list = []
    for _ in range(rng.choice([10, 100, 5000])):
        deep = [deep]
    return deep


def test_fuzzed_configs_give_success_or_a_typed_error():
    import dataclasses

    from ecamp.config import EcampCfg, ModelConfig
    from ecamp.models.pretrain import ECAMPPretrainConfig
    from ecamp.schema import from_mapping, update
    from ecamp.train.pretrain.config import PretrainRunConfig

    rng = random.Random(26)
    base = PretrainRunConfig()
    sections = {f.name: [g.name for g in dataclasses.fields(getattr(base, f.name))] for f in dataclasses.fields(base)}
    pretrain_fields = [f.name for f in dataclasses.fields(ECAMPPretrainConfig)]
    ecamp_fields = [f.name for f in dataclasses.fields(EcampCfg) if f.name not in ("extra", "keys")]
    outcomes = {"ok": 0, "typed": 0}
    for _ in range(250):
        section = rng.choice(sorted(sections))
        doc = {section: {rng.choice(sections[section]): _random_value(rng)}}
        calls = [
            lambda doc=doc: update(base, doc, source="fuzz.yaml"),
            lambda: from_mapping(ECAMPPretrainConfig, {rng.choice(pretrain_fields): _random_value(rng)},
                                 source="fuzz.json"),
            lambda: EcampCfg.from_dict({rng.choice(ecamp_fields): _random_value(rng)}),
            lambda: ModelConfig.from_dict({"architecture": "vit_base_patch16_224", "num_classes": _random_value(rng),
                                           "label_names": _random_value(rng),
                                           "ecamp": {rng.choice(ecamp_fields): _random_value(rng)}}),
        ]
        for call in calls:
            try:
                call()
                outcomes["ok"] += 1
            except EcampError as e:
                assert len(str(e)) < 3000, str(e)[:300]
                outcomes["typed"] += 1
    assert outcomes["ok"] > 30 and outcomes["typed"] > 300, outcomes
