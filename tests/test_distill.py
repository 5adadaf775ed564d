"""``ecamp distill`` against a fake OpenAI-compatible server on 127.0.0.1, and the transformers backend."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from ecamp.train.pretrain.distill import (
    PROMPT_VERSION,
    DistillError,
    OpenAIBackend,
    build_messages,
    distill,
    merge_context,
    validate_context,
)


class FakeLLM:
    """Answers chat completions; per-report misbehaviour is keyed on a word in the report text."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls: dict[str, int] = {}
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, b'{"error": "not found"}')
                fake.auth.append(self.headers.get("Authorization"))
                if "REJECT" in body["messages"][-1]["content"]:
                    return self._send(400, b'{"error": "context length exceeded"}')
                user = body["messages"][-1]["content"]
                sid = user.split("Report: ")[1].split(" ", 1)[0]
                with fake.lock:
                    n = fake.calls[sid] = fake.calls.get(sid, 0) + 1
                if fake.delay:
                    time.sleep(fake.delay)
                if "SLOW" in user and n == 1:
                    time.sleep(1.5)  # past the client's timeout: retried
                if "BUSY" in user and n <= 2:
                    return self._send(429, b'{"error": "rate limited"}', {"Retry-After": "0.05"})
                if "FLAKY" in user and n == 1:
                    return self._send(500, b'{"error": "oops"}')
                if "GARBLED" in user and n == 1:
                    return self._send(200, b'{"choices": [ not json')
                if "INVENT" in user:
                    text = "Pneumothorax, cardiomegaly, edema and fibrosis are all present here, clearly."
                else:
                    text = f"Context for {sid}: an effusion is fluid in the pleural space, dense at the lung base."
                reply = {"choices": [{"message": {"role": "assistant", "content": text}}]}
                return self._send(200, json.dumps(reply).encode())

            def _send(self, code, data, headers=None):
                self.send_response(code)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (its timeout): that is the point of the SLOW case

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.stop()


def _reports(path: Path, rows: list[tuple[str, str]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["study_id", "report"])
        w.writerows(rows)
    return path


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_prompt_and_validation():
    msgs = build_messages("Small left pleural effusion. No pneumothorax.", "cxr")
    assert msgs[0]["role"] == "system" and "Findings: effusion, pneumothorax" in msgs[1]["content"]
    assert "fluorescein" in build_messages("x", "fundus")[0]["content"]
    report = "Small effusion."
    assert validate_context("An effusion is fluid around the lung, seen at the base.", report) is None
    assert "empty" in validate_context("  ", report)
    assert "too short" in validate_context("Fluid.", report)
    assert "absent from the report" in validate_context("Effusion with edema, fibrosis and mass nearby.", report)


def test_retries_slow_rate_limited_failing_and_malformed(llm, tmp_path):
    rows = [(f"s{i}", f"s{i} small effusion {tag}") for i, tag in
            enumerate(["", "SLOW", "BUSY", "FLAKY", "GARBLED", "", "INVENT"])]
    reports = _reports(tmp_path / "r.csv", rows + [("s7", "   ")])
    waits = []
    summary = distill(reports, tmp_path / "c.jsonl", OpenAIBackend(llm.url, "fake", timeout=0.5), concurrency=3,
                      max_retries=3, backoff=0.01, progress=False, sleep=lambda s: (waits.append(s), time.sleep(s)))
    out = _lines(tmp_path / "c.jsonl")
    assert sorted(o["study_id"] for o in out) == ["s0", "s1", "s2", "s3", "s4", "s5"]
    assert all(o["prompt_version"] == PROMPT_VERSION and o["model"] == "fake" for o in out)
    assert set(summary.failed) == {"s6", "s7"}
    assert "absent from the report" in summary.failed["s6"] and summary.failed["s7"] == "empty report"
    assert llm.calls["s2"] == 3 and llm.calls["s3"] == 2 and llm.calls["s4"] == 2 and llm.calls["s1"] == 2
    assert any(0.05 <= w < 0.07 for w in waits)  # Retry-After honoured
    assert summary.lines()[0].startswith("6 written, 0 already done, 2 failed")


def test_bad_inputs_and_endpoints(llm, tmp_path):
    with pytest.raises(DistillError, match="lacks column"):
        distill(_write(tmp_path / "x.csv", "id,report\n1,a\n"), tmp_path / "o.jsonl",
                OpenAIBackend(llm.url, "m"), progress=False)
    with pytest.raises(DistillError, match="twice with different reports"):
        distill(_write(tmp_path / "y.csv", "study_id,report\n1,a\n1,b\n"), tmp_path / "o.jsonl",
                OpenAIBackend(llm.url, "m"), progress=False)
    with pytest.raises(DistillError, match="404"):
        distill(_reports(tmp_path / "z.csv", [("s1", "s1 effusion")]), tmp_path / "o.jsonl",
                OpenAIBackend(llm.url.replace("/v1", "/nope"), "m"), progress=False)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_kill_mid_run_then_resume_loses_and_repeats_nothing(tmp_path):
    server = FakeLLM(delay=0.15)
    try:
        reports = _reports(tmp_path / "r.csv", [(f"s{i:02d}", f"s{i:02d} small left effusion") for i in range(30)])
        out = tmp_path / "c.jsonl"
        cmd = [sys.executable, "-m", "ecamp", "train", "distill", "--reports", str(reports), "--out", str(out),
               "--backend", "openai", "--base-url", server.url, "--model", "fake", "--concurrency", "2",
               "--no-progress"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.time() + 120
        while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 5):
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        first = _lines(out)
        assert 5 <= len(first) < 30
        # a torn last line, as a kill during a write would leave
        with open(out, "a") as f:
            f.write('{"study_id": "s99", "prompt_ver')
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert "already done" in done.stdout
        ids = [o["study_id"] for o in _lines(out)]
        assert sorted(ids) == [f"s{i:02d}" for i in range(30)] and len(ids) == len(set(ids))
        assert ids[: len(first)] == [o["study_id"] for o in first]
    finally:
        server.stop()


def test_merge_writes_the_pretraining_layout(tmp_path):
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"study_id": "1", "prompt_version": PROMPT_VERSION, "context": "C1."}) + "\n" +
        json.dumps({"study_id": "2", "prompt_version": "old-version", "context": "stale"}) + "\n")
    _write(tmp_path / "images.csv", "study_id,img_path,report\n1,a.jpg,R1\n1,b.jpg,R1\n2,c.jpg,R2\n")
    counts = merge_context(tmp_path / "images.csv", tmp_path / "c.jsonl", tmp_path / "pre.csv")
    assert counts == {"rows": 3, "with_context": 2}
    rows = list(csv.DictReader(open(tmp_path / "pre.csv")))
    assert [(r["img_path"], r["llm_output"]) for r in rows] == [("a.jpg", "C1."), ("b.jpg", "C1."), ("c.jpg", "")]


def test_transformers_backend_with_a_tiny_random_model(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from ecamp.train.pretrain.distill import TransformersBackend

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["report findings effusion pleural fluid small left lung base context notes"] * 3
    tok.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]", "[EOS]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    folder = tmp_path / "tiny-lm"
    fast.save_pretrained(folder)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=fast.vocab_size, n_positions=512, n_embd=32, n_layer=1, n_head=2,
                                       pad_token_id=fast.pad_token_id, eos_token_id=fast.eos_token_id,
                                       bos_token_id=None))
    with torch.no_grad():  # a random model happily emits [PAD]; zero logits for the special tokens make it talk
        model.transformer.wte.weight[[0, 1, 2]] = 0.0
    model.save_pretrained(folder)
    backend = TransformersBackend(str(folder), batch_size=2, max_new_tokens=12, min_new_tokens=12, device="cpu")
    reports = _reports(tmp_path / "r.csv", [("a", "small left effusion"), ("b", "pleural fluid"),
                                            ("c", "lung base effusion")])
    summary = distill(reports, tmp_path / "c.jsonl", backend, progress=False, min_chars=1,
                      new_entity_tolerance=10)
    out = _lines(tmp_path / "c.jsonl")
    assert summary.written == 3 and not summary.failed, summary.failed
    assert {o["study_id"] for o in out} == {"a", "b", "c"}
    assert all(o["model"] == str(folder) and o["context"] for o in out)


def test_api_key_from_the_named_variable_only(llm, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-default")
    monkeypatch.setenv("MY_KEY", "sk-mine")
    reports = _reports(tmp_path / "r.csv", [("s1", "s1 small effusion")])
    distill(reports, tmp_path / "a.jsonl", OpenAIBackend(llm.url, "m", api_key_env="MY_KEY"), progress=False)
    assert llm.auth[-1] == "Bearer sk-mine"
    monkeypatch.delenv("MY_KEY")
    distill(reports, tmp_path / "b.jsonl", OpenAIBackend(llm.url, "m", api_key_env="MY_KEY"), progress=False)
    assert llm.auth[-1] is None  # an unset variable sends nothing, never another variable's key


def test_client_errors_fail_the_report_without_retries(llm, tmp_path):
    reports = _reports(tmp_path / "r.csv", [("s1", "s1 small effusion REJECT"), ("s2", "s2 small effusion")])
    summary = distill(reports, tmp_path / "c.jsonl", OpenAIBackend(llm.url, "m"), max_retries=4, progress=False)
    assert len(llm.auth) == 2 and "HTTP 400" in summary.failed["s1"] and summary.written == 1  # one request each


class CountingProxy:
    """An HTTP proxy on 127.0.0.1 standing in for a remote LLM service: every request through it is counted and
    answered as a chat completion, so a test sees whether a report left for a "remote" host."""

    def __init__(self):
        self.requests: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append(self.path)
                text = "Context: an effusion is fluid in the pleural space, dense at the lung base, often bilateral."
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_endpoint_classes():
    from ecamp.train.pretrain.distill import is_private_endpoint

    for url in ("http://127.0.0.1:8000/v1", "http://localhost:8000/v1", "http://10.1.2.3/v1", "http://192.168.0.5/v1",
                "http://172.16.4.1:8080/v1", "http://[::1]:8000/v1", "http://169.254.1.1/v1"):
        assert is_private_endpoint(url), url
    for url in ("https://8.8.8.8/v1", "https://llm.example.invalid/v1", "not a url"):
        assert not is_private_endpoint(url), url


def test_remote_endpoint_needs_allow_remote_llm_and_sends_nothing_without(tmp_path, monkeypatch, capsys):
    from ecamp.cli import main
    from ecamp.errors import RestrictedDataError

    proxy = CountingProxy()
    try:
        for var in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
            monkeypatch.setenv(var, proxy.url)
        for var in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(var, raising=False)
        reports = _reports(tmp_path / "r.csv", [("s1", "s1 small left effusion"), ("s2", "s2 right effusion")])
        remote = "http://llm.example.invalid/v1"
        args = ["train", "distill", "--reports", str(reports), "--base-url", remote, "--model", "m",
                "--no-progress", "--max-retries", "0"]
        assert main([*args, "--out", str(tmp_path / "refused.jsonl")]) != 0
        err = capsys.readouterr().err
        assert "MIMIC-CXR" in err and "third-party" in err and "--allow-remote-llm" in err
        assert proxy.requests == [] and not (tmp_path / "refused.jsonl").exists()
        with pytest.raises(RestrictedDataError, match="FFA-IR"):
            OpenAIBackend(remote, "m", modality="fundus")
        assert proxy.requests == []

        # allowed: the reports do go out (through the proxy, as they would to the service)
        assert main([*args, "--out", str(tmp_path / "allowed.jsonl"), "--allow-remote-llm"]) == 0
        assert len(proxy.requests) == 2 and all("llm.example.invalid" in p for p in proxy.requests)
        assert len(_lines(tmp_path / "allowed.jsonl")) == 2
        assert main([*args, "--out", str(tmp_path / "free.jsonl"), "--reports-not-credentialed"]) == 0
        assert len(proxy.requests) == 4
    finally:
        proxy.stop()
