"""Batched embedding: order, bad files, workers, the CLI, and resuming after a kill."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ecamp


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        p = root / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (80 + i, 90), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


@pytest.fixture(scope="module")
def model(tiny_folder):
    return ecamp.load(f"local-dir:{tiny_folder}")


def _direct(model, paths) -> np.ndarray:
    tf = ecamp.get_transform(model)
    with torch.no_grad():
        return np.stack([model(tf(p)[None])[0].numpy() for p in paths])


def test_embed_matches_one_by_one_and_marks_bad_files(model, images, tmp_path, caplog):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    inputs = [images[0], bad, images[1], images[2]]
    with caplog.at_level(logging.WARNING, logger="ecamp"):
        emb = ecamp.embed(model, inputs, batch_size=3, progress=False)
    assert emb.shape == (4, 48) and emb.dtype == np.float32
    assert np.isnan(emb[1]).all() and not np.isnan(emb[[0, 2, 3]]).any()
    assert np.allclose(emb[[0, 2, 3]], _direct(model, [images[0], images[1], images[2]]), atol=1e-5)
    assert "1 of 4 inputs could not be read" in caplog.text and "broken.png" in caplog.text


def test_embed_with_workers_and_bf16(model, images):
    ref = ecamp.embed(model, images, batch_size=4, progress=False)
    with_workers = ecamp.embed(model, images, batch_size=3, num_workers=2, progress=False)
    assert np.allclose(ref, with_workers, atol=1e-6)
    bf16 = ecamp.embed(model, images, batch_size=8, dtype=torch.bfloat16, progress=False)
    assert np.allclose(ref, bf16, atol=0.1) and not np.array_equal(ref, bf16)


def test_embed_rejects_empty_and_all_bad(model, tmp_path):
    with pytest.raises(ecamp.EcampError, match="no inputs"):
        ecamp.embed(model, [], progress=False)
    with pytest.raises(ecamp.EcampError, match="None of the 1 inputs"):
        ecamp.embed(model, [tmp_path / "nope.png"], progress=False)


def _cli(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "ecamp", *args], capture_output=True, text=True, timeout=300, **kw)
    if check:
        assert out.returncode == 0, out.stderr
    return out


def test_cli_embed_npy_and_safetensors(tiny_folder, model, images, tmp_path):
    folder = images[0].parent
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    out = _cli("embed", str(folder), "--model", f"local-dir:{tiny_folder}", "--out", str(tmp_path / "e.npy"),
               "--batch-size", "3", "--no-progress", "--runtime", "torch")  # torch's float32, compared at 1e-5
    assert "embedded 8 of 8 files" in out.stdout
    emb = np.load(tmp_path / "e.npy")
    files = (tmp_path / "e.npy.files.txt").read_text().split()
    assert files == [str(p) for p in images]
    assert np.allclose(emb, _direct(model, images), atol=1e-5)
    bad = tmp_path / "bad.dcm"
    bad.write_bytes(b"DICM" * 10)
    out = _cli("embed", str(images[0]), str(bad), "--model", f"local-dir:{tiny_folder}", "--out",
               str(tmp_path / "e.safetensors"), "--no-progress", "--runtime", "torch")
    assert "embedded 1 of 2 files" in out.stdout and "bad.dcm" in out.stderr
    from safetensors import safe_open

    with safe_open(tmp_path / "e.safetensors", "np") as f:
        meta = f.metadata()
        emb2 = f.get_tensor("embeddings")
    assert json.loads(meta["files"]) == [str(images[0]), str(bad)]
    assert str(bad) in json.loads(meta["failed"])
    assert np.isnan(emb2[1]).all() and np.allclose(emb2[0], emb[0], atol=1e-6)
    assert not list(tmp_path.glob("*.partial"))


def test_cli_embed_resumes_after_kill(tiny_folder, images, tmp_path):
    out = tmp_path / "r.npy"
    args = ["embed", *map(str, images), "--model", f"local-dir:{tiny_folder}", "--out", str(out),
            "--chunk-size", "2", "--batch-size", "1", "--no-progress"]
    # Kill the process (SIGKILL, no clean-up) while it reads the 6th image, in the third chunk.
    script = (
        "import os, signal, sys\n"
        "import ecamp.io as io\n"
        "real = io.decode_image\n"
        "def reader(src, **kw):\n"
        "    if str(src).endswith('img_05.png'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, **kw)\n"
        "io.decode_image = reader  # every image file is read through it\n"
        "from ecamp.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    killed = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "r.npy.partial").glob("chunk-*")) == \
        ["chunk-000000.npz", "chunk-000001.npz"]
    resumed = _cli(*args)
    assert "resumed 2 finished chunk(s)" in resumed.stdout
    fresh = _cli(*[a if a != str(out) else str(tmp_path / "f.npy") for a in args])
    assert "resumed" not in fresh.stdout
    assert np.array_equal(np.load(out), np.load(tmp_path / "f.npy"))


def test_resume_never_mixes_models_and_keeps_head_width(tiny_folder, images, tmp_path, monkeypatch):
    import ecamp.io as eio
    from ecamp.embedding import embed_files

    out = tmp_path / "m.npy"
    files = [str(p) for p in images[:4]]
    a = ecamp.load(f"local-dir:{tiny_folder}")
    b = ecamp.load(f"local-dir:{tiny_folder}", num_classes=3)  # same files, other weights and width
    real = eio.decode_image

    def interrupted(src, **kw):
        if str(src) == files[2]:
            raise KeyboardInterrupt  # as a Ctrl-C in the second chunk would
        return real(src, **kw)

    monkeypatch.setattr(eio, "decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        embed_files(a, files, out, chunk_size=2, progress=False)
    monkeypatch.setattr(eio, "decode_image", real)
    assert [p.name for p in (tmp_path / "m.npy.partial").glob("chunk-*")] == ["chunk-000000.npz"]
    res = embed_files(b, files, out, chunk_size=2, progress=False)
    assert res.resumed_chunks == 0
    emb = np.load(out)
    assert emb.shape == (4, 3) and np.allclose(emb, _direct(b, images[:4]), atol=1e-5)
    # a chunk in which nothing is readable keeps the width of the others
    missing = [str(tmp_path / "gone1.png"), str(tmp_path / "gone2.png")]
    res = embed_files(b, files[:2] + missing, tmp_path / "h.npy", chunk_size=2, progress=False)
    h = np.load(tmp_path / "h.npy")
    assert h.shape == (4, 3) and not np.isnan(h[:2]).any() and np.isnan(h[2:]).all()
    assert set(res.failures) == set(missing)


def test_embed_model_in_bfloat16(tiny_folder, images):
    m = ecamp.load(f"local-dir:{tiny_folder}", dtype=torch.bfloat16)
    emb = ecamp.embed(m, images[:2], progress=False)
    assert emb.dtype == np.float32 and emb.shape == (2, 48) and np.isfinite(emb).all()


def test_find_images_picks_dicom_without_suffix(tmp_path, images):
    from pydicom.data import get_testdata_file

    from ecamp.embedding import find_images

    (tmp_path / "IM000001").write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes())
    (tmp_path / "README").write_text("not an image")
    Image.open(images[0]).save(tmp_path / "a.png")
    assert find_images([tmp_path]) == [str(tmp_path / "IM000001"), str(tmp_path / "a.png")]


def _cli(*args, env=None, torchrun: int = 0):
    import os

    base = [sys.executable, "-m", "ecamp"] if not torchrun else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun), "-m",
         "ecamp"]
    return subprocess.run([*base, *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def test_two_processes_and_shards_give_the_single_process_result(tiny_folder, images, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    inputs = [*images[:3], bad, *images[3:]]  # 9 files, chunks of 2: 5 chunks, one unreadable file
    common = ["--model", f"local-dir:{tiny_folder}", "--chunk-size", "2", "--batch-size", "2", "--no-progress"]
    one = _cli("embed", *inputs, "--out", tmp_path / "one.npy", *common)
    assert one.returncode == 0, one.stderr
    ref = np.load(tmp_path / "one.npy")
    ref_files = (tmp_path / "one.npy.files.txt").read_text()
    two = _cli("embed", *inputs, "--out", tmp_path / "two.npy", *common, torchrun=2)
    assert two.returncode == 0, two.stderr
    assert np.array_equal(np.load(tmp_path / "two.npy"), ref, equal_nan=True)
    assert (tmp_path / "two.npy.files.txt").read_text() == ref_files
    assert json.loads((tmp_path / "two.npy.failed.json").read_text()).keys() == {str(bad)}
    # job-array shards: each does its part, merging before all are done says what is missing
    first = _cli("embed", *inputs, "--out", tmp_path / "sh.npy", *common, "--shard", "0/2")
    assert first.returncode == 0 and "embed merge" in first.stdout, first.stderr
    assert not (tmp_path / "sh.npy").exists()
    early = _cli("embed", "merge", "--out", tmp_path / "sh.npy")
    assert early.returncode == 2 and "2 of 5 chunks are not done" in early.stderr
    second = _cli("embed", *inputs, "--out", tmp_path / "sh.npy", *common, "--shard", "1/2")
    assert second.returncode == 0, second.stderr
    merged = _cli("embed", "merge", "--out", tmp_path / "sh.npy")
    assert merged.returncode == 0, merged.stderr
    assert np.array_equal(np.load(tmp_path / "sh.npy"), ref, equal_nan=True)
    assert (tmp_path / "sh.npy.files.txt").read_text() == ref_files
    # a rank whose chunks are done (here by an earlier shard run) does not redo them
    again = _cli("embed", *inputs, "--out", tmp_path / "re.npy", *common, "--shard", "0/2")
    assert again.returncode == 0, again.stderr
    done = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "re.npy.partial").glob("chunk-*.npz")}
    assert sorted(done) == ["chunk-000000.npz", "chunk-000002.npz", "chunk-000004.npz"]
    resumed = _cli("embed", *inputs, "--out", tmp_path / "re.npy", *common, torchrun=2)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed 3 finished chunk(s)" in resumed.stdout
    assert np.array_equal(np.load(tmp_path / "re.npy"), ref, equal_nan=True)


def test_progress_is_plain_lines_when_not_a_terminal(tiny_folder, images, tmp_path):
    out = _cli("embed", *images, "--out", tmp_path / "e.npy", "--model", f"local-dir:{tiny_folder}",
               "--batch-size", "2", env={"ECAMP_PROGRESS_INTERVAL": "0"})
    assert out.returncode == 0, out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("embed 1/1:")]
    assert "\r" not in out.stderr and len(lines) >= 4
    assert lines[-1].startswith(f"embed 1/1: {len(images)}/{len(images)} img (100 %)")


def test_preprocessing_on_the_device_gives_the_cpu_embeddings(model, images, tmp_path, tiny_folder):
    from pydicom.data import get_testdata_file

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    inputs = [get_testdata_file("RG1_UNCR.dcm"), *images[:3], bad, np.asarray(Image.open(images[3]))]
    ref = ecamp.embed(model, inputs, batch_size=3, progress=False, preprocess_on="cpu")
    assert np.array_equal(ecamp.embed(model, inputs, batch_size=3, progress=False), ref, equal_nan=True)  # auto: cpu
    # "gpu" is the torch half on the embedding device, here the CPU; decoding in two worker processes
    dev = ecamp.embed(model, inputs, batch_size=3, num_workers=2, progress=False, preprocess_on="gpu")
    assert np.isnan(dev[4]).all() and not np.isnan(dev[[0, 1, 2, 3, 5]]).any()
    assert np.allclose(dev, ref, atol=0.01, equal_nan=True)  # inputs within a grey level of each other
    with pytest.raises(ecamp.EcampError, match="preprocess_on"):
        ecamp.embed(model, inputs, progress=False, preprocess_on="tpu")
    with pytest.raises(ecamp.EcampError, match="eval EcampTransform"):
        ecamp.embed(model, inputs, progress=False, preprocess_on="gpu", transform=ecamp.get_transform(model).__call__)
    out = _cli("embed", *images[:2], "--model", f"local-dir:{tiny_folder}", "--out", tmp_path / "g.npy",
               "--preprocess-on", "gpu", "--device", "cpu", "--no-progress")
    assert out.returncode == 0, out.stderr
    assert np.allclose(np.load(tmp_path / "g.npy"), ref[1:3], atol=0.01)


# -- features and output formats ----------------------------------------------------------------------------------
def test_cls_and_token_features_are_forward_features(model, images, tmp_path):
    from safetensors.numpy import load_file

    from ecamp.embedding import embed, embed_files

    tf = ecamp.get_transform(model)
    with torch.no_grad():
        tokens = np.stack([model.forward_features(tf(p)[None])[0].numpy() for p in images[:3]])
    np.testing.assert_allclose(embed(model, images[:3], features="tokens", progress=False), tokens, atol=1e-5)
    np.testing.assert_allclose(embed(model, images[:3], features="cls", progress=False), tokens[:, 0], atol=1e-5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    files = [str(images[0]), str(bad), str(images[1]), str(images[2])]
    said = []
    embed_files(model, files, tmp_path / "t.safetensors", features="tokens", chunk_size=2, progress=False,
                announce=said.append)
    assert said == [f"tokens features of 4 files: [4, 17, 48] float32, {4 * 17 * 48 * 4 / 1e6:.3g} MB -> "
                    f"{tmp_path / 't.safetensors'}"]
    got = load_file(tmp_path / "t.safetensors")["embeddings"]
    assert got.shape == (4, 17, 48) and np.isnan(got[1]).all()
    np.testing.assert_allclose(got[[0, 2, 3]], tokens, atol=1e-5)
    embed_files(model, files, tmp_path / "t.npy", features="tokens", chunk_size=2, progress=False)
    np.testing.assert_array_equal(np.load(tmp_path / "t.npy"), got)
    with pytest.raises(ecamp.errors.InvalidArgumentError, match="over the limit of 1e-05 GB"):
        embed_files(model, files, tmp_path / "big.safetensors", features="tokens", max_output_gb=1e-5)
    with pytest.raises(ecamp.errors.InvalidArgumentError, match="safetensors or .npy"):
        embed_files(model, files, tmp_path / "t.csv", features="tokens")
    assert not (tmp_path / "big.safetensors.partial").exists()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_tables_have_a_path_column_and_one_column_per_feature(tiny_folder, model, images, tmp_path, suffix):
    pd = pytest.importorskip("pandas")
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    files = [str(p) for p in images[:3]] + [str(bad)]
    out = tmp_path / f"e{suffix}"
    run = _cli("embed", *files, "--model", f"local-dir:{tiny_folder}", "--out", str(out), "--no-progress",
               "--features", "cls", "--chunk-size", "2")
    assert "cls features of 4 files: [4, 48] float32" in run.stderr
    table = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert list(table.columns) == ["path", *[f"f{i}" for i in range(48)]] and list(table["path"]) == files
    expected = ecamp.embedding.embed(model, files, features="cls", progress=False)
    np.testing.assert_allclose(table.iloc[:, 1:].to_numpy(np.float32), expected, atol=1e-6, equal_nan=True)
    assert str(bad) in json.loads((tmp_path / f"e{suffix}.failed.json").read_text())


def test_sharded_parquet_and_token_runs_merge(tiny_folder, images, tmp_path):
    pytest.importorskip("pyarrow")
    pd = pytest.importorskip("pandas")
    from safetensors.numpy import load_file

    model_arg = f"local-dir:{tiny_folder}"
    for out, features in ((tmp_path / "s.parquet", "pooled"), (tmp_path / "s.safetensors", "tokens")):
        for i in range(2):
            _cli("embed", *map(str, images), "--model", model_arg, "--out", str(out), "--shard", f"{i}/2",
                 "--chunk-size", "3", "--no-progress", "--features", features, "--runtime", "torch")
        _cli("embed", "merge", "--out", str(out))
        whole = ecamp.embedding.embed(ecamp.load(model_arg), images, features=features, progress=False)
        got = pd.read_parquet(out).iloc[:, 1:].to_numpy(np.float32) if out.suffix == ".parquet" else \
            load_file(out)["embeddings"]
        np.testing.assert_allclose(got, whole, atol=1e-5)
