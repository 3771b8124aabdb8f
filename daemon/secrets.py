"""Known secret values, and `redact`, which takes them out of any text before it is written.

Secrets come from the environment: the config names them as `${OPENAI_API_KEY}` and stages
read some by default (`$OPENAI_API_KEY`). Each value, whole or in the shortened form servers
echo back (`sk-SECR****T123`, `sk-S...T123`), is replaced by its reference (`${OPENAI_API_KEY}`)
in error lines (daemon/io/outbox.py) and in every log record (`install_log_redaction`).

Registered: the values of environment variables whose names look like secrets (`*KEY*`,
`*TOKEN*`, `*SECRET*`, `*PASSWORD*`, ...), both those the config references and those in the
environment, and config values under secret-looking keys (`api_key`). Values shorter than
MIN_CHARS are not secrets worth the false positives (a `1` would be redacted everywhere).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from collections.abc import Iterable, Mapping
from typing import Any

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)
MIN_CHARS = 8
MIN_SHOWN = 4  # a shortened echo must show this many characters of the key to be recognised
# A shortened echo: some leading characters, a run of masking, some trailing characters.
_SHORTENED = re.compile(r"([A-Za-z0-9_\-]*)(?:\*{3,}|\.{3}|…)([A-Za-z0-9_\-]*)")

_lock = threading.Lock()
_known: dict[str, str] = {}  # value -> what to show instead
_compiled: re.Pattern | None = None  # every known value, longest first; rebuilt when one is added


def looks_secret(name: str) -> bool:
    return bool(SECRET_NAME.search(name)) and not name.lower().endswith("_env")


def remember(value: Any, shown_as: str) -> None:
    global _compiled
    if isinstance(value, str) and len(value) >= MIN_CHARS:
        with _lock:
            if value not in _known:
                _known[value] = shown_as
                _compiled = re.compile("|".join(re.escape(v) for v in sorted(_known, key=len, reverse=True)))
        install_log_redaction()


def remember_environment(environ: Mapping[str, str] | None = None) -> None:
    for name, value in (os.environ if environ is None else environ).items():
        if looks_secret(name):
            remember(value, f"${{{name}}}")


def remember_config(node: Any, path: str = "") -> None:
    """Config values under secret-looking keys (`api_key: sk-...` written in the file itself)."""
    if isinstance(node, dict):
        for key, value in node.items():
            where = f"{path}.{key}" if path else str(key)
            if isinstance(value, str) and looks_secret(str(key)):
                remember(value, f"<{where}>")
            elif isinstance(value, str) and str(key).lower().endswith("_env") and value in os.environ:
                remember(os.environ[value], f"${{{value}}}")  # api_key_env: OPENAI_API_KEY
            else:
                remember_config(value, where)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            remember_config(value, f"{path}[{index}]")


def known() -> Iterable[str]:
    with _lock:
        return list(_known)


def _shortened(match: re.Match) -> str:
    head, tail = match.group(1), match.group(2)
    if len(head) + len(tail) < MIN_SHOWN:
        return match.group(0)
    with _lock:
        for value, shown in _known.items():
            if value.startswith(head) and value.endswith(tail) and len(head) + len(tail) < len(value):
                return shown
    return match.group(0)


def redact(text: str) -> str:
    """`text` with every known secret, whole or shortened, replaced by its reference."""
    if not _known or not isinstance(text, str):
        return text
    pattern = _compiled
    if pattern is not None:
        text = pattern.sub(lambda m: _known.get(m.group(0), "***"), text)
    if "*" in text or "..." in text or "…" in text:
        text = _SHORTENED.sub(_shortened, text)
    return text


_installed = False
_base_factory = logging.getLogRecordFactory()


def _redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
    """Every log record, from any logger and for any handler, redacted as it is made."""
    record = _base_factory(*args, **kwargs)
    if not _known:
        return record
    try:
        message = record.getMessage()
    except Exception:  # a broken format call: logging reports it when the record is emitted
        return record
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    if record.exc_info and record.exc_info[1] is not None:
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = redact(text)  # Formatter uses exc_text as is when it is set
    return record


def install_log_redaction() -> None:
    global _installed
    if not _installed:
        _installed = True
        logging.setLogRecordFactory(_redacting_factory)
