"""APIGenerator (DataFlow-Gen's API step) against the real server; the retry policy's arithmetic."""

from __future__ import annotations

import email.utils
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from stages.base import StageError
from stages.registry import stage_class
from stages.text.api_client import backoff_delay, parse_retry_after
from tests.stages.conftest import SECRET
from tests.stages.text.fault_proxy import Fault

API = stage_class("TextGenerator", "APIGenerator")


def rows(n: int) -> list[dict]:
    return [{"id": str(i), "text": f"caption {i}", "_job": "t", "_media_dir": Path("/tmp")} for i in range(n)]


async def test_key_from_the_environment_and_retries(proxy, lm_server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    proxy.plan(Fault.error(500, "flaky"))
    config = API.Config(
        model_id=f"openai:{lm_server.model}", base_url=proxy.url, max_tokens=4, backoff_s=0.05, output_key="answer"
    )
    stage = API(config, "cpu")
    stage.load()
    out = await stage.aprocess(rows(3))
    assert all(set(o) == {"answer"} and o["answer"] for o in out)
    assert {s.headers["authorization"] for s in proxy.log} == {f"Bearer {SECRET}"}
    body = proxy.log[-1].body
    assert body["model"] == lm_server.model
    assert body["messages"][0] == {"role": "system", "content": "You are a helpful assistant"}
    usage = stage.take_usage()
    assert usage["requests"] == 4 and usage["retries"] == 1 and usage["tokens_out"] == 12
    assert SECRET not in repr(config) + config.model_dump_json()


async def test_final_error_is_redacted(proxy, lm_server, monkeypatch):
    monkeypatch.setenv("MY_PROVIDER_KEY", SECRET)
    proxy.plan(Fault.echo_auth())
    config = API.Config(model_id=f"local:{lm_server.model}", base_url=proxy.url, api_key_env="MY_PROVIDER_KEY")
    stage = API(config, "cpu")
    out = await stage.aprocess(rows(1))
    assert isinstance(out[0], StageError) and "HTTP 401" in out[0].message and SECRET not in out[0].message


def test_config_refusals(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ValidationError, match="set OPENAI_API_KEY"):
        API.Config(model_id="openai:gpt-4o")
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    with pytest.raises(ValidationError, match='must be "provider:model"'):
        API.Config(model_id="gpt-4o")
    with pytest.raises(ValidationError, match="unknown provider 'acme'.*set base_url"):
        API.Config(model_id="acme:big-model")
    config = API.Config(model_id="openai:gpt-4o")
    assert (config.provider, config.model, config.endpoint) == ("openai", "gpt-4o", "https://api.openai.com/v1")


def test_dataflow_sampling_keys_reach_the_request_or_are_refused_by_name(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    config = API.Config(
        model_id="openai:gpt-4o", stop=["\n\n"], presence_penalty=0.5, frequency_penalty=-0.25, n=1, stream=False
    )
    from stages.text.common import ChatBatch

    stage = API(config, "cpu")
    chats = ChatBatch.of(rows(1), system=config.prompt, prompt=config.user_prompt, text_key=config.text_key, stage="t")
    request = stage._request(config, chats).body
    assert request["stop"] == ["\n\n"]
    assert (request["presence_penalty"], request["frequency_penalty"]) == (0.5, -0.25)
    assert "n" not in request and "stream" not in request
    with pytest.raises(ValidationError, match="n: 3 would ask for 3 answers per record"):
        API.Config(model_id="openai:gpt-4o", n=3)
    with pytest.raises(ValidationError, match="stream: true is not supported"):
        API.Config(model_id="openai:gpt-4o", stream=True)


def test_backoff_policy():
    for attempt in range(6):
        ceiling = min(8.0, 0.5 * 2**attempt)
        waits = [backoff_delay(attempt, 0.5, 8.0, None) for _ in range(200)]
        assert all(ceiling / 2 <= w <= ceiling for w in waits)
        assert max(waits) - min(waits) > ceiling / 10  # jittered
    assert 2.0 <= backoff_delay(0, 0.5, 8.0, 2.0) <= 2.2  # Retry-After wins over the exponential
    assert backoff_delay(0, 0.5, 8.0, 9.0) is None  # longer than max_backoff_s: give up now


def test_retry_after_forms():
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    date = email.utils.formatdate(time.time() + 5, usegmt=True)
    assert 3.5 <= parse_retry_after({"retry-after": date}) <= 5.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
