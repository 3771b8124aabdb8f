"""GPTTextGenerator against a real `transformers serve`, with faults injected by a real proxy."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from stages.base import StageError
from stages.registry import stage_class
from tests.stages.conftest import SECRET
from tests.stages.text.fault_proxy import Fault

GPT = stage_class("TextGenerator", "GPTTextGenerator")


def make(base_url: str, model: str, **overrides) -> GPT:
    settings = {
        "model": model,
        "base_url": base_url,
        "api_key": SECRET,
        "max_num_seqs": 4,
        "temperature": 0.7,
        "sys_prompt": "You turn captions into prompts.",
        "prompt": "Rewrite this caption:",
        "max_tokens": 6,
        "timeout_s": 5,
        "max_retries": 3,
        "backoff_s": 0.05,
        "max_backoff_s": 3,
    }
    settings.update(overrides)
    stage = GPT(GPT.Config(**settings), "cpu")
    stage.load()
    return stage


def rows(n: int, **extra) -> list[dict]:
    return [
        {"id": str(i), "text": f"a cat number {i} plays with a ball", "_job": "t", "_media_dir": Path("/tmp"), **extra}
        for i in range(n)
    ]


async def test_answers_every_record_and_counts_usage(proxy, lm_server):
    stage = make(proxy.url, lm_server.model)
    out = await stage.aprocess(rows(5))
    assert [set(o) for o in out] == [{"text"}] * 5
    assert all(isinstance(o["text"], str) and o["text"] for o in out)
    sent = sorted(s.body["messages"][1]["content"] for s in proxy.log)
    assert sent == [f"Rewrite this caption:\na cat number {i} plays with a ball" for i in range(5)]
    first = proxy.log[0].body
    assert first["messages"][0] == {"role": "system", "content": "You turn captions into prompts."}
    assert first["model"] == lm_server.model and first["max_tokens"] == 6 and first["temperature"] == 0.7
    usage = stage.take_usage()
    assert usage["requests"] == 5 and usage["retries"] == 0
    assert usage["tokens_out"] == 5 * 6  # the tiny model never stops early, so each answer is max_tokens long
    assert usage["tokens_in"] > 5 * 10
    # Greedy on the server: the same record gives the same answer straight from the server.
    direct = await make(lm_server.base_url, lm_server.model).aprocess(rows(1))
    assert direct[0]["text"] == out[0]["text"]


async def test_template_prompt_and_output_key(proxy, lm_server):
    stage = make(proxy.url, lm_server.model, prompt="Style {style}: {caption}", output_key="gen_prompt")
    good = {"id": "a", "caption": "a dog runs", "style": "anime", "_job": "t", "_media_dir": Path("/tmp")}
    missing = {"id": "b", "caption": "a bird", "_job": "t", "_media_dir": Path("/tmp")}
    out = await stage.aprocess([good, missing])
    assert set(out[0]) == {"gen_prompt"}
    assert isinstance(out[1], StageError) and out[1].error_type == "MissingField" and "{style}" in out[1].message
    assert [s.body["messages"][1]["content"] for s in proxy.log] == ["Style anime: a dog runs"]
    assert stage.config.input_fields() == {"style": "text", "caption": "text"}


async def test_concurrency_is_bounded_by_max_num_seqs(proxy, lm_server):
    proxy.plan(default=Fault.slow(0.3))
    stage = make(proxy.url, lm_server.model, max_num_seqs=2)
    started = time.monotonic()
    out = await stage.aprocess(rows(6))
    assert all("text" in o for o in out)
    assert proxy.max_inflight == 2
    assert time.monotonic() - started >= 3 * 0.3  # 6 requests, 2 at a time


async def test_429_retry_after_is_honoured(proxy, lm_server):
    proxy.plan(Fault.error(429, "slow down", retry_after="1"), Fault.error(503, "warming up"))
    stage = make(proxy.url, lm_server.model, backoff_s=0.05)
    out = await stage.aprocess(rows(1))
    assert "text" in out[0]
    assert [s.fault for s in proxy.log] == ["status", "status", "pass"]
    assert proxy.log[1].started - proxy.log[0].finished >= 1.0  # Retry-After: 1
    assert proxy.log[2].started - proxy.log[1].finished < 1.0  # 503 without Retry-After: short backoff
    usage = stage.take_usage()
    assert usage["requests"] == 3 and usage["retries"] == 2


async def test_retry_after_beyond_max_backoff_fails_at_once(proxy, lm_server):
    proxy.plan(Fault.error(429, "quota exhausted", retry_after="120"))
    stage = make(proxy.url, lm_server.model, max_backoff_s=5)
    started = time.monotonic()
    out = await stage.aprocess(rows(1))
    assert time.monotonic() - started < 2
    assert isinstance(out[0], StageError) and out[0].error_type == "RateLimitError"
    assert "HTTP 429: quota exhausted" in out[0].message and "max_backoff_s=5" in out[0].message


async def test_backoff_grows_exponentially(proxy, lm_server):
    proxy.plan(*[Fault.error(500, "boom")] * 3)
    stage = make(proxy.url, lm_server.model, backoff_s=0.2, max_backoff_s=10)
    out = await stage.aprocess(rows(1))
    assert "text" in out[0]
    gaps = [b.started - a.finished for a, b in zip(proxy.log, proxy.log[1:], strict=False)]
    # equal jitter: wait n in [0.2 * 2**n / 2, 0.2 * 2**n]
    for n, gap in enumerate(gaps):
        assert 0.1 * 2**n - 0.02 <= gap <= 0.2 * 2**n + 0.15, gaps


async def test_final_failure_names_status_and_server_message(proxy, lm_server):
    proxy.plan(default=Fault.error(502, "upstream model crashed"))
    stage = make(proxy.url, lm_server.model, max_retries=2)
    out = await stage.aprocess(rows(2))
    for error in out:
        assert isinstance(error, StageError) and error.error_type == "InternalServerError"
        assert "HTTP 502: upstream model crashed (after 3 attempt(s))" in error.message
        assert proxy.url in error.message
    usage = stage.take_usage()
    assert usage["requests"] == 6 and usage["retries"] == 4


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_other_4xx_are_not_retried(proxy, lm_server, status):
    proxy.plan(Fault.error(status, f"refused with {status}"))
    stage = make(proxy.url, lm_server.model)
    out = await stage.aprocess(rows(1))
    assert isinstance(out[0], StageError)
    assert f"HTTP {status}: refused with {status} (not retried)" in out[0].message
    assert len(proxy.log) == 1 and stage.usage["retries"] == 0


async def test_real_server_400_is_not_retried(proxy, lm_server):
    stage = make(proxy.url, "no-such-model")
    out = await stage.aprocess(rows(1))
    assert isinstance(out[0], StageError) and out[0].error_type == "BadRequestError"
    assert "HTTP 400: Server is pinned to" in out[0].message and "'no-such-model'" in out[0].message
    assert len(proxy.log) == 1


async def test_slow_answer_beyond_timeout_is_retried(proxy, lm_server):
    proxy.plan(Fault.slow(3.0))
    stage = make(proxy.url, lm_server.model, timeout_s=0.6)
    started = time.monotonic()
    out = await stage.aprocess(rows(1))
    assert "text" in out[0]
    assert time.monotonic() - started < 2.5
    assert stage.usage["retries"] == 1


async def test_trickling_answer_hits_the_total_deadline(proxy, lm_server):
    # Headers at once, then a byte every 50 ms: no single read times out, the whole call does.
    proxy.plan(Fault.trickle(0.05), Fault.trickle(0.05))
    stage = make(proxy.url, lm_server.model, timeout_s=0.8, max_retries=1)
    started = time.monotonic()
    out = await stage.aprocess(rows(1))
    assert isinstance(out[0], StageError) and out[0].error_type == "APITimeoutError"
    assert "timeout_s=0.8" in out[0].message and "after 2 attempt(s)" in out[0].message
    assert time.monotonic() - started < 3


async def test_dropped_connections_are_retried(proxy, lm_server):
    proxy.plan(Fault.drop(), Fault.hang(0.2))
    stage = make(proxy.url, lm_server.model)
    out = await stage.aprocess(rows(1))
    assert "text" in out[0]
    assert [s.fault for s in proxy.log] == ["drop", "hang", "pass"]
    assert stage.usage["retries"] == 2


async def test_dead_endpoint_never_stalls(dead_port, lm_server):
    stage = make(f"http://127.0.0.1:{dead_port}/v1", lm_server.model, max_retries=2, timeout_s=1)
    started = time.monotonic()
    out = await stage.aprocess(rows(3))
    assert time.monotonic() - started < 3
    for error in out:
        assert isinstance(error, StageError) and error.error_type == "APIConnectionError"
        assert "after 3 attempt(s)" in error.message


async def test_silent_endpoint_times_out(lm_server):
    import socket

    with socket.socket() as listener:  # accepts connections, never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        port = listener.getsockname()[1]
        stage = make(f"http://127.0.0.1:{port}/v1", lm_server.model, max_retries=1, timeout_s=0.5)
        started = time.monotonic()
        out = await stage.aprocess(rows(2))
        assert time.monotonic() - started < 2.5
    assert all(isinstance(e, StageError) and e.error_type == "APITimeoutError" for e in out)


async def test_json_mode_accepts_only_json_objects(proxy, lm_server):
    proxy.plan(Fault.bad_json(), Fault.passthrough(), Fault.json())
    stage = make(proxy.url, lm_server.model, response_format="json_object")
    out = await stage.aprocess(rows(1))
    assert set(json.loads(out[0]["text"])) == {"text"}
    assert [s.fault for s in proxy.log] == ["bad_json", "pass", "json"]  # broken JSON, then plain text: retried
    assert proxy.log[0].body["response_format"] == {"type": "json_object"}
    assert stage.usage["retries"] == 2


async def test_json_mode_gives_up_with_invalid_json_error(proxy, lm_server):
    proxy.plan(default=Fault.bad_json())
    stage = make(proxy.url, lm_server.model, response_format={"type": "json_object"}, max_retries=1)
    out = await stage.aprocess(rows(1))
    assert isinstance(out[0], StageError) and out[0].error_type == "InvalidJSON"
    assert "not valid JSON" in out[0].message and "after 2 attempt(s)" in out[0].message


async def test_api_key_never_leaks(proxy, lm_server, caplog):
    caplog.set_level(logging.DEBUG)
    proxy.plan(Fault.error(500, f"key {SECRET} rejected"), Fault.echo_auth())
    stage = make(proxy.url, lm_server.model)
    out = await stage.aprocess(rows(1))
    assert proxy.log[0].headers["authorization"] == f"Bearer {SECRET}"  # it was sent ...
    error = out[0]
    assert isinstance(error, StageError) and error.error_type == "AuthenticationError"
    visible = [error.message, repr(error), str(error), caplog.text, repr(stage.config), str(stage.config)]
    visible += [stage.config.model_dump_json(), json.dumps(stage.config.model_dump(mode="json"))]
    assert "Incorrect API key provided" in error.message
    for text in visible:  # ... and shows up nowhere
        assert SECRET not in text and SECRET[:8] not in text and SECRET[-8:] not in text


async def test_settings_apply_on_the_next_batch(proxy, lm_server):
    stage = make(proxy.url, lm_server.model)
    await stage.aprocess(rows(1))
    stage.config.temperature = 0.0
    stage.config.max_num_seqs = 1
    stage.config.sys_prompt = "Be terse."
    await stage.aprocess(rows(3))
    assert proxy.log[-1].body["temperature"] == 0.0
    assert proxy.log[-1].body["messages"][0]["content"] == "Be terse."
    assert proxy.max_inflight == 1


def test_config_errors_say_what_to_fix():
    from pydantic import ValidationError

    cases = {
        "response_format": ({"response_format": "xml"}, "json_object"),
        "base_url": ({"base_url": "127.0.0.1:8000"}, "http://"),
        "max_num_seqs": ({"max_num_seqs": 0}, "greater than or equal to 1"),
        "prompt": ({"prompt": "Rewrite {caption} now}"}, "literal braces"),
        "backend": ({"backend": "transformers", "base_url": "http://x/v1"}, "cannot use base_url"),
        "unknown": ({"max_token": 5}, "Extra inputs"),
    }
    for name, (override, expected) in cases.items():
        with pytest.raises(ValidationError) as caught:
            GPT.Config(model="m", **override)
        assert expected in str(caught.value), name
    # A JSON example in a prompt is not a template: used verbatim, text_key appended.
    config = GPT.Config(model="m", prompt='Answer as {"prompt": "..."}.')
    assert config.input_fields() == {"text": "text"}


def test_no_key_for_openai_is_a_start_up_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    stage = GPT(GPT.Config(model="gpt-4o-mini"), "cpu")
    with pytest.raises(RuntimeError, match="OPENAI_API_KEY"):
        stage.load()
