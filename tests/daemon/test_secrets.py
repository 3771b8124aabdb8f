"""Secrets never echoed: config messages show `${OPENAI_API_KEY}`, not its value; a server's echo
of the key (whole or shortened, `sk-SECR****T123`) is redacted from error lines and log records."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from daemon import secrets
from daemon.config import ConfigError, parse_config
from daemon.io.outbox import OutboxLayout
from daemon.metrics import Metrics
from daemon.runtime.engine import Engine, JobInput
from tests.harness import read_jsonl, write_config

pytestmark = pytest.mark.timeout(120)

KEY = "sk-SECRETVALUE-0123456789-T123"
SHORT = "sk-SECR****T123"  # how OpenAI-style servers quote a key back


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)


def test_redact_whole_and_shortened_forms():
    secrets.remember(KEY, "${OPENAI_API_KEY}")
    text = f"bad key {KEY}; Incorrect API key provided: {SHORT}. also sk-S...T123 and sk-SECRETVALUE…"
    cleaned = secrets.redact(text)
    assert "SECR" not in cleaned and "T123" not in cleaned and "SECRETVALUE" not in cleaned, cleaned
    assert cleaned.count("${OPENAI_API_KEY}") == 4
    assert secrets.redact("loading... 3 **** items") == "loading... 3 **** items"  # no key there: untouched
    secrets.remember("short", "${X}")  # too short to be redacted everywhere
    assert secrets.redact("a short note") == "a short note"


def test_config_messages_show_the_reference_not_the_value(key_env):
    text = (
        "steps:\n  - type: TextGenerator\n    name: GPTTextGenerator\n    config:\n"
        "      model: m\n      base_url: ${OPENAI_API_KEY}\n      max_num_seqs: ${OPENAI_API_KEY}\n"
    )
    with pytest.raises(ConfigError) as caught:
        parse_config(text)
    message = str(caught.value)
    assert KEY not in message and "SECRETVALUE" not in message, message
    assert "max_num_seqs: Input should be a valid integer" in message and "'${OPENAI_API_KEY}'" in message
    assert "base_url must start with http:// or https://, got '${OPENAI_API_KEY}'" in message


def test_reelflow_check_prints_the_reference(tmp_path):
    config = write_config(
        tmp_path,
        {
            "steps": [
                {
                    "type": "TextGenerator",
                    "name": "GPTTextGenerator",
                    "config": {"model": "m", "max_num_seqs": "${OPENAI_API_KEY}", "temperature": "${MY_TOKEN}"},
                }
            ]
        },
    )
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ".", "OPENAI_API_KEY": KEY, "MY_TOKEN": "tok-0123456789"}
    result = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    output = result.stdout + result.stderr
    assert KEY not in output and "tok-0123456789" not in output, output
    assert "'${OPENAI_API_KEY}'" in output and "'${MY_TOKEN}'" in output


def test_log_records_are_redacted(caplog):
    secrets.remember(KEY, "${OPENAI_API_KEY}")
    caplog.set_level(logging.INFO)
    logging.getLogger("reelflow.test").warning("server said: %s (full: %s)", SHORT, KEY)
    try:
        raise RuntimeError(f"rejected {KEY}")
    except RuntimeError:
        logging.getLogger("reelflow.test").exception("call failed")
    for handler_text in (caplog.text, "\n".join(r.getMessage() for r in caplog.records)):
        assert "SECR" not in handler_text and "T123" not in handler_text, handler_text
    assert "server said: ${OPENAI_API_KEY} (full: ${OPENAI_API_KEY})" in caplog.text
    assert "RuntimeError: rejected ${OPENAI_API_KEY}" in caplog.text


class _RejectingServer(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that refuses every key, quoting it shortened as OpenAI does."""

    def do_POST(self):  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = json.dumps(
            {
                "error": {
                    "message": f"Incorrect API key provided: {SHORT}. You can find your API key at ...",
                    "type": "invalid_request_error",
                    "code": "invalid_api_key",
                }
            }
        ).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


async def test_a_servers_shortened_echo_never_reaches_the_errors_file(tmp_path, key_env, caplog):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RejectingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        config = parse_config(
            "steps:\n  - type: TextGenerator\n    name: GPTTextGenerator\n    config:\n"
            f"      model: m\n      base_url: {url}\n      api_key: ${{OPENAI_API_KEY}}\n      max_retries: 0\n"
        )
        meta = tmp_path / "m.jsonl"
        meta.write_text(json.dumps({"id": "a", "text": "hello"}) + "\n")
        engine = Engine(config, OutboxLayout.daemon(tmp_path / "out"), Metrics())
        await engine.start()
        try:
            run = await engine.run_job(JobInput("m", meta, "jsonl", "m.jsonl", tmp_path))
        finally:
            await engine.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert (run.ok, run.errors) == (0, 1)
    raw = (tmp_path / "out" / "m.errors.jsonl").read_text()
    assert "SECR" not in raw and "T123" not in raw, raw
    [error] = read_jsonl(tmp_path / "out" / "m.errors.jsonl")
    assert "Incorrect API key provided: ${OPENAI_API_KEY}" in error["message"]
    assert "SECR" not in caplog.text
