"""Entity-centred context from a large language model (``ecamp distill``), resumable and concurrent.

The authors asked Vicuna for context about the entities of each MIMIC-CXR report and inserted its answer into the
report during pre-training (dossier 4.1-4.2); their prompt is unpublished. The prompts here are our own wording,
versioned (``PROMPT_VERSION``): each output line records the version it was made with, and a run only skips
reports already done *with the same version*.

Backends: any OpenAI-compatible chat-completions endpoint (vLLM, TGI, llama.cpp and Ollama servers speak it), with
bounded concurrency, timeouts, retries with exponential back-off and jitter, and ``Retry-After`` on 429; and a local
``transformers`` causal LM with batched generation.

Output (JSONL, one object per line): ``study_id``, ``prompt_version``, ``model``, ``context``, ``entities``. Lines
are appended and flushed one by one, so an interrupted run loses at most the line being written (a torn last line
is dropped on resume) and never writes a study twice.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ecamp.errors import DistillError, MissingDependencyError
from ecamp.fileio import write_csv
from ecamp.text.entities import ENTITIES
from ecamp.train.common.lists import read_table

__all__ = ["PROMPT_VERSION", "PROMPTS", "DistillError", "OpenAIBackend", "is_private_endpoint", "check_endpoint",
           "TransformersBackend", "build_messages", "validate_context", "find_entities", "distill",
           "merge_context", "DistillSummary"]

logger = logging.getLogger("ecamp")


def is_private_endpoint(base_url: str) -> bool:
    """True when ``base_url``'s host is this machine or a private network: a loopback, private (RFC 1918, IPv6
    unique-local) or link-local address, ``localhost``, or a name whose every address is one of those. A name
    that does not resolve counts as remote."""
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    host = urlsplit(base_url).hostname
    if not host:
        return False

    def private(address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address.split("%")[0])
        except ValueError:
            return False
        return ip.is_loopback or ip.is_private or ip.is_link_local

    if host == "localhost" or host.endswith(".localhost") or private(host):
        return True
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    return bool(found) and all(private(a) for a in found)


def check_endpoint(base_url: str, *, allow_remote: bool = False, reports_credentialed: bool = True,
                   modality: str = "cxr") -> None:
    """Refuse to send credentialed reports to an endpoint off this machine and off private networks.

    MIMIC-CXR's and FFA-IR's reports are under the PhysioNet Credentialed Health Data License, whose data-use
    terms forbid sending them to third-party services (hosted LLM APIs); so a remote ``base_url`` needs
    ``allow_remote`` (``--allow-remote-llm``: the service is covered, e.g. a provider under an agreement that
    allows it) unless the reports are not credentialed (``reports_credentialed=False``). Raises
    :class:`~ecamp.publish.RestrictedDataError` before any request."""
    if allow_remote or not reports_credentialed or is_private_endpoint(base_url):
        return
    from ecamp.errors import RestrictedDataError

    data = "FFA-IR" if modality == "fundus" else "MIMIC-CXR"
    raise RestrictedDataError(
        f"--base-url {base_url} is neither on this machine nor on a private network. The data-use terms of "
        f"{data} (PhysioNet Credentialed Health Data License 1.5.0) forbid sending its reports to third-party "
        f"services, hosted LLM APIs included. Serve the LLM yourself (vLLM, TGI, Ollama on localhost or your own "
        f"network); pass --allow-remote-llm only if that service is allowed to receive them, or "
        f"--reports-not-credentialed for reports under no such terms. Nothing was sent.", path=base_url)

PROMPT_VERSION = "ecamp-context-v1"
PROMPTS = {
    "cxr": (
        "You are a radiologist writing teaching notes. For each finding named below from a chest X-ray report, "
        "write one or two plain sentences on what the finding is and how it looks on a radiograph (location, "
        "density, typical appearance). Do not add findings that are not listed, do not repeat the report, and do "
        "not give a diagnosis or advice."),
    "fundus": (
        "You are an ophthalmologist writing teaching notes. For each finding named below from a fundus angiography "
        "report, write one or two plain sentences on what the finding is and how it appears on fluorescein "
        "angiography (location, leakage or filling pattern). Do not add findings that are not listed, do not repeat "
        "the report, and do not give a diagnosis or advice."),
}


def find_entities(text: str, entities: Iterable[str] = ENTITIES) -> list[str]:
    """Entity words of the list that occur in ``text`` (case-insensitive whole words), in list order."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    return [e.lower() for e in entities if e.lower() in words]


def build_messages(report: str, modality: str = "cxr", entities: Sequence[str] | None = None) -> list[dict[str, str]]:
    if modality not in PROMPTS:
        raise DistillError(f"Unknown modality {modality!r}; prompts exist for {sorted(PROMPTS)}.")
    found = list(entities) if entities is not None else find_entities(report)
    listed = ", ".join(found) if found else "(none named; describe the main findings of the report)"
    return [{"role": "system", "content": PROMPTS[modality]},
            {"role": "user", "content": f"Report: {report.strip()}\nFindings: {listed}"}]


def validate_context(context: Any, report: str, *, min_chars: int = 20, max_chars: int = 2000,
                     new_entity_tolerance: int = 1) -> str | None:
    """None if the answer is usable, else why not: empty, too short or long, or naming more than
    ``new_entity_tolerance`` entities of the list that the report does not mention (invented findings)."""
    if not isinstance(context, str) or not context.strip():
        return "empty answer"
    n = len(context.strip())
    if n < min_chars:
        return f"answer too short ({n} < {min_chars} characters)"
    if n > max_chars:
        return f"answer too long ({n} > {max_chars} characters)"
    invented = set(find_entities(context)) - set(find_entities(report))
    if len(invented) > new_entity_tolerance:
        return f"answer names findings absent from the report: {sorted(invented)}"
    return None


class _Retryable(Exception):
    def __init__(self, message: str, wait_s: float | None = None):
        super().__init__(message)
        self.wait_s = wait_s


class _Rejected(Exception):
    """The server refused this request for good (a 4xx other than 429): no retry, the report fails."""


@dataclass
class OpenAIBackend:
    """Chat completions through the ``openai`` client (any OpenAI-compatible server: vLLM, TGI, llama.cpp, Ollama,
    hosted endpoints); ``api_key`` defaults to ``$OPENAI_API_KEY`` (unset for local servers).

    The client's own retries are off: :func:`distill` retries rate limits (honouring ``Retry-After``), server
    errors, timeouts, dropped connections and malformed answers with capped back-off, and counts them per report.
    """

    base_url: str
    model: str
    api_key: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # read when api_key is None; only this variable
    timeout: float = 60.0
    temperature: float = 0.2
    max_tokens: int = 400
    allow_remote: bool = False  # send reports to an endpoint off this machine and off private networks
    reports_credentialed: bool = True  # the reports are under a data-use licence (MIMIC-CXR's, FFA-IR's)
    modality: str = "cxr"  # whose licence a refusal names
    name: str = field(init=False, default="openai")

    def __post_init__(self) -> None:
        check_endpoint(self.base_url, allow_remote=self.allow_remote, reports_credentialed=self.reports_credentialed,
                       modality=self.modality)
        try:
            import openai
        except ImportError as e:
            raise MissingDependencyError("--backend openai needs the openai client: pip install \"ecamp[train]\"") \
                from e
        key = self.api_key if self.api_key is not None else os.environ.get(self.api_key_env)
        # without a key (local servers) no Authorization header is sent, never another variable's key: the client
        # would read $OPENAI_API_KEY itself, so it gets a placeholder and the header is dropped
        self._headers = {} if key else {"Authorization": openai.Omit()}
        self._client = openai.OpenAI(base_url=self.base_url.rstrip("/"), api_key=key or "unused",
                                     timeout=self.timeout, max_retries=0)
        self._openai = openai

    @property
    def model_id(self) -> str:
        return self.model

    def complete(self, messages: list[dict[str, str]]) -> str:
        openai, url = self._openai, self.base_url.rstrip("/") + "/chat/completions"
        try:
            raw = self._client.chat.completions.with_raw_response.create(
                model=self.model, messages=messages, temperature=self.temperature, max_tokens=self.max_tokens,
                extra_headers=self._headers)
            text = raw.http_response.text
        except (openai.RateLimitError, openai.InternalServerError) as e:
            retry_after = e.response.headers.get("retry-after")
            wait_s = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() else None
            raise _Retryable(f"HTTP {e.status_code}: {e.response.text[:300]}", wait_s) from e
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            raise DistillError(f"{url} refused the credentials (HTTP {e.status_code}); set OPENAI_API_KEY or "
                               f"--api-key-env.") from e
        except openai.NotFoundError as e:
            raise DistillError(f"{url} answered 404: wrong --base-url (it should end in /v1) or unknown model "
                               f"{self.model!r}: {e.response.text[:300]}") from e
        except openai.APIStatusError as e:
            if e.status_code >= 500:
                raise _Retryable(f"HTTP {e.status_code}: {e.response.text[:300]}") from e
            raise _Rejected(f"HTTP {e.status_code}: {e.response.text[:300]}") from e
        except openai.APIConnectionError as e:  # timeouts included (APITimeoutError)
            raise _Retryable(f"{type(e).__name__}: {e}") from e
        try:  # parsed here, so a malformed answer is retried rather than raised from inside the client
            return json.loads(text)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise _Retryable(f"malformed response: {text[:200]!r}") from e


@dataclass
class TransformersBackend:
    """A local causal LM (path or Hub id) through ``transformers``, generating for ``batch_size`` reports at once."""

    model_name_or_path: str
    batch_size: int = 8
    max_new_tokens: int = 200
    min_new_tokens: int = 1
    device: str | None = None
    name: str = field(init=False, default="transformers")

    def __post_init__(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path)
        self.tokenizer.padding_side = "left"  # generation continues on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        self.model = AutoModelForCausalLM.from_pretrained(self.model_name_or_path).eval()
        from ecamp.distributed import select_device

        self.device = select_device(self.device)
        self.model.to(self.device)
        self.model_id = str(self.model_name_or_path)

    def _prompt(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(m["content"] for m in messages) + "\n\nNotes:"

    def complete_batch(self, batch: list[list[dict[str, str]]]) -> list[str]:
        import torch

        prompts = [self._prompt(m) for m in batch]
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=self.max_new_tokens,
                                      min_new_tokens=self.min_new_tokens, do_sample=False,
                                      pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]


@dataclass
class DistillSummary:
    total: int = 0
    skipped_done: int = 0
    written: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # study_id -> last reason

    def lines(self) -> list[str]:
        out = [f"{self.written} written, {self.skipped_done} already done, {len(self.failed)} failed "
               f"(of {self.total} reports)"]
        reasons: dict[str, int] = {}
        for r in self.failed.values():
            key = r.split(":")[0][:80]
            reasons[key] = reasons.get(key, 0) + 1
        out += [f"  {n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        return out


def _read_reports(path: Path) -> list[tuple[str, str]]:
    seen: dict[str, str] = {}
    rows = []
    for k, r in enumerate(read_table(path, ["study_id", "report"], error=DistillError, allow_empty=True)):
        sid, rep = (r["study_id"] or "").strip(), r["report"] or ""
        if not sid:
            raise DistillError(f"{path} row {k + 2} has no study_id.", path=path)
        if sid in seen:
            if seen[sid] != rep:
                raise DistillError(f"{path}: study {sid} appears twice with different reports.", path=path)
            continue
        seen[sid] = rep
        rows.append((sid, rep))
    return rows


def _done(out: Path, version: str) -> set[str]:
    """Studies already in ``out`` for ``version``; a torn last line (from a kill) is cut off."""
    if not out.is_file():
        return set()
    data = out.read_bytes()
    if data and not data.endswith(b"\n"):
        data = data[: data.rfind(b"\n") + 1]
        with open(out, "r+b") as f:
            f.truncate(len(data))
    done = set()
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            if obj.get("prompt_version") == version:
                done.add(str(obj["study_id"]))
    return done


def distill(reports_csv: str | Path, out_jsonl: str | Path, backend: Any, *, modality: str = "cxr",
            concurrency: int = 4, max_retries: int = 5, backoff: float = 1.0, max_backoff: float = 60.0,
            progress: bool = True, min_chars: int = 20, max_chars: int = 2000, new_entity_tolerance: int = 1,
            sleep: Callable[[float], None] = time.sleep) -> DistillSummary:
    """Distil context for every report of ``reports_csv`` (``study_id``, ``report``) into ``out_jsonl``."""
    from ecamp.console import progress_bar

    rows = _read_reports(Path(reports_csv))
    out = Path(out_jsonl)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _done(out, PROMPT_VERSION)
    todo = [(s, r) for s, r in rows if s not in done]
    summary = DistillSummary(total=len(rows), skipped_done=len(rows) - len(todo))
    model_id = str(getattr(backend, "model_id", "") or "")
    lock = threading.Lock()
    bar = progress_bar(total=len(todo), desc="distill", unit="report", disable=not progress)
    f = open(out, "a", encoding="utf-8")

    def write(sid: str, report: str, context: str) -> None:
        line = json.dumps({"study_id": sid, "prompt_version": PROMPT_VERSION, "model": model_id,
                           "context": context.strip(), "entities": find_entities(report)})
        with lock:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
            summary.written += 1
            bar.update(1)

    def fail(sid: str, reason: str) -> None:
        with lock:
            summary.failed[sid] = reason
            bar.update(1)

    def attempt_loop(sid: str, report: str, call: Callable[[], str]) -> None:
        reason = "no attempt"
        for attempt in range(max_retries + 1):
            try:
                context = call()
            except _Rejected as e:
                reason = str(e)
                break
            except _Retryable as e:
                reason = str(e)
                if attempt == max_retries:
                    break
                delay = min(max_backoff, e.wait_s if e.wait_s is not None else backoff * 2**attempt)
                sleep(delay * (1 + 0.25 * random.random()))
                continue
            problem = validate_context(context, report, min_chars=min_chars, max_chars=max_chars,
                                       new_entity_tolerance=new_entity_tolerance)
            if problem is None:
                write(sid, report, context)
                return
            reason = f"invalid answer: {problem}"
        fail(sid, reason)

    try:
        empty = [(s, r) for s, r in todo if not r.strip()]
        for s, _ in empty:
            fail(s, "empty report")
        todo = [(s, r) for s, r in todo if r.strip()]
        if hasattr(backend, "complete_batch"):
            size = max(1, getattr(backend, "batch_size", 8))
            for i in range(0, len(todo), size):
                chunk = todo[i:i + size]
                answers = backend.complete_batch([build_messages(r, modality) for _, r in chunk])
                for (sid, report), answer in zip(chunk, answers, strict=True):
                    attempt_loop(sid, report, lambda a=answer: a)
        else:
            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                pending = set()
                it = iter(todo)
                for sid, report in it:
                    pending.add(pool.submit(attempt_loop, sid, report,
                                            lambda r=report: backend.complete(build_messages(r, modality))))
                    if len(pending) >= 2 * concurrency:
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            fut.result()  # DistillError (credentials, bad URL) stops the run
                for fut in pending:
                    fut.result()
    finally:
        f.close()
        bar.close()
    return summary


def merge_context(images_csv: str | Path, context_jsonl: str | Path, out_csv: str | Path, *,
                  prompt_version: str = PROMPT_VERSION) -> dict[str, int]:
    """Write the pre-training CSV (``img_path, report, llm_output``) from an image list with ``study_id``,
    ``img_path`` and ``report`` columns and the distilled contexts; studies without a context get an empty
    ``llm_output`` (the report is then used alone, as when the authors' 80 % insertion does not fire)."""
    contexts: dict[str, str] = {}
    for line in Path(context_jsonl).read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            if obj.get("prompt_version") == prompt_version:
                contexts[str(obj["study_id"])] = obj["context"]
    rows = read_table(images_csv, ["study_id", "img_path", "report"], error=DistillError, allow_empty=True)
    out_rows = [[r["img_path"], r["report"], contexts.get(str(r["study_id"]).strip(), "")] for r in rows]
    write_csv(out_csv, ["img_path", "report", "llm_output"], out_rows)
    return {"rows": len(rows), "with_context": sum(1 for r in out_rows if r[2])}
