"""``--device auto`` picks CUDA, then Apple's MPS, then the CPU, with the availability checks patched."""

from __future__ import annotations

import logging

import pytest
import torch

import ecamp.distributed as dist
from ecamp.errors import InvalidArgumentError


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda:1"), (False, True, "mps"),
                                                       (False, False, "cpu")])
def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, caplog, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)  # no GPU here: record the call
    with caplog.at_level(logging.INFO, logger="ecamp"):
        for spec in ("auto", None, "AUTO"):
            assert str(dist.select_device(spec, local_rank=1)) == expected
    assert [str(d) for d in chosen] == ([expected] * 3 if cuda else [])
    assert sum(f"device: {expected} (auto:" in r.getMessage() for r in caplog.records) == 3


def test_an_explicit_device_is_kept_and_logged(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="ecamp"):
        assert dist.select_device("cpu") == torch.device("cpu")
    assert "device: cpu" in caplog.text
    with pytest.raises(InvalidArgumentError, match="Unknown device"):
        dist.select_device("gpu-please")


def test_every_device_option_defaults_to_auto():
    from ecamp.cli import build_parser

    parser = build_parser()
    for cmd in (["embed", "x", "--model", "m", "--out", "o.npy"], ["predict", "x", "--model", "m", "--out", "o.csv"]):
        assert parser.parse_args(cmd).device == "auto"


def test_library_functions_take_auto(monkeypatch, tiny_folder):
    import numpy as np

    import ecamp

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    model = ecamp.load(f"local-dir:{tiny_folder}")
    x = np.random.default_rng(0).random((64, 64), dtype=np.float32)
    assert ecamp.embedding.embed(model, [x], device="auto", progress=False).shape == (1, 48)
