"""Chat completions over any OpenAI-compatible endpoint, with our retry policy.

The official `openai` AsyncOpenAI client sends the requests; its own retries are off
(`max_retries=0`) so that the policy here is the one that counts:

- at most `max_num_seqs` requests in flight per stage instance (a semaphore, held only
  while a request is on the wire, not while backing off);
- every attempt is bounded by `timeout_s` twice over: the HTTP client's timeouts and a total
  deadline around the whole call, so a server that accepts the connection and then trickles
  bytes (or nothing) cannot stall a worker;
- timeouts, connection errors, HTTP 408, 429 and 5xx, malformed answers and (in JSON mode)
  answers that are not a JSON object are retried up to `max_retries` times, waiting
  `backoff_s * 2**attempt` (capped at `max_backoff_s`) with jitter, or what the server's
  `Retry-After` / `retry-after-ms` header says; a `Retry-After` longer than `max_backoff_s`
  ends the record at once rather than stall the daemon;
- other 4xx answers are not retried;
- the final failure is a StageError naming the status code and the server's own message,
  with every secret redacted.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from stages.base import StageError
from stages.engines import Generation
from stages.text.common import check_json_object, redact

log = logging.getLogger(__name__)

RETRY_STATUS = frozenset({408, 429})  # plus every 5xx


class RetrySettings(Protocol):
    """The config fields the client reads on every call (hot reload changes them in place)."""

    max_num_seqs: int
    timeout_s: float
    max_retries: int
    backoff_s: float
    max_backoff_s: float


@dataclass
class APIRequest:
    """What a batch's requests share besides their messages (the settings snapshot of one batch)."""

    settings: RetrySettings
    body: dict[str, Any]  # model, temperature, ... (everything but `messages`)
    base_url: str | None
    api_key: str
    json_mode: bool
    record_ids: list[str]


@dataclass
class Failure:
    error_type: str
    message: str
    retryable: bool
    retry_after: float | None = None


def backoff_delay(attempt: int, backoff_s: float, max_backoff_s: float, retry_after: float | None) -> float | None:
    """Seconds to wait before retry number `attempt + 1`; None when the server asks for too long.

    Without `retry_after`: exponential (`backoff_s * 2**attempt`, capped) with equal jitter,
    i.e. uniform in [d/2, d]. With it: at least `retry_after`, plus up to 10% jitter.
    """
    if retry_after is not None:
        if retry_after > max_backoff_s:
            return None
        return retry_after + random.uniform(0, 0.1 * retry_after)
    ceiling = min(max_backoff_s, backoff_s * (2**attempt))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from `retry-after-ms` or `Retry-After` (seconds or an HTTP date); None if absent."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) / scale)
        except ValueError:
            pass
        parsed = email.utils.parsedate_tz(value)
        if parsed is not None:
            return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def server_message(body: Any, fallback: str) -> str:
    """The human part of an error body: OpenAI's `{"error": {"message"}}`, FastAPI's `{"detail"}`, ..."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            for key in ("message", "detail", "msg"):
                if inner.get(key):
                    return str(inner[key])[:500]
        elif inner:
            return str(inner)[:500]
        if body.get("detail"):
            return str(body["detail"])[:500]
    if isinstance(body, str | bytes) and body:
        text = body.decode(errors="replace") if isinstance(body, bytes) else body
        return text.strip()[:500]
    return fallback[:500]


def classify(exc: BaseException, timeout_s: float) -> Failure:
    import openai

    if isinstance(exc, StageError):  # raised by our own answer checks (invalid JSON, empty answer)
        return Failure(exc.error_type, exc.message, retryable=True)
    if isinstance(exc, TimeoutError | openai.APITimeoutError):
        return Failure("APITimeoutError", f"no complete answer within timeout_s={timeout_s:g} s", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f"{exc.message} ({type(cause).__name__}: {cause})" if cause else exc.message
        return Failure("APIConnectionError", detail, retryable=True)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in RETRY_STATUS or status >= 500
        reason = server_message(exc.body, exc.message)
        headers = exc.response.headers if exc.response is not None else None
        retry_after = parse_retry_after(headers) if retryable else None
        return Failure(type(exc).__name__, f"HTTP {status}: {reason}", retryable, retry_after)
    if isinstance(exc, openai.APIResponseValidationError):
        return Failure("BadResponse", f"the server's answer does not parse as a chat completion: {exc}", True)
    return Failure(type(exc).__name__, str(exc) or repr(exc), retryable=False)


class ChatAPI:
    """One stage instance's connection to a chat-completions endpoint (composed, not inherited):
    the asynchronous text backend of the API steps.

    The AsyncOpenAI client and the concurrency semaphore belong to the event loop that
    created them; both are rebuilt when the loop, the endpoint, the key, the timeout or
    `max_num_seqs` change, so hot-reloaded settings apply on the next call.
    """

    asynchronous = True

    def __init__(self, usage: Callable[[], Counter[str]], label: str):
        self._usage = usage  # the owner's counter, looked up each time (take_usage swaps it)
        self.label = label
        self._client: Any = None
        self._client_key: tuple | None = None
        self._slots: asyncio.Semaphore | None = None
        self._slots_key: tuple | None = None

    def _client_for(self, base_url: str | None, api_key: str, timeout_s: float):
        import openai

        loop = asyncio.get_running_loop()
        key = (id(loop), base_url, hashlib.sha256(api_key.encode()).hexdigest(), timeout_s)
        if self._client_key != key:
            self._client = openai.AsyncOpenAI(
                api_key=api_key,
                base_url=base_url,
                timeout=openai.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
                max_retries=0,
            )
            self._client_key = key
        return self._client

    def _slots_for(self, max_num_seqs: int) -> asyncio.Semaphore:
        key = (id(asyncio.get_running_loop()), max_num_seqs)
        if self._slots_key != key:
            self._slots = asyncio.Semaphore(max_num_seqs)
            self._slots_key = key
        return self._slots

    async def complete(
        self,
        settings: RetrySettings,
        request: dict[str, Any],
        *,
        base_url: str | None,
        api_key: str,
        json_mode: bool,
        record_id: str = "?",
    ) -> str:
        """The assistant's answer for one request, or a StageError after the retries."""
        client = self._client_for(base_url, api_key, settings.timeout_s)
        slots = self._slots_for(settings.max_num_seqs)
        attempt = 0
        while True:
            try:
                async with slots:
                    self._usage()["requests"] += 1
                    response = await asyncio.wait_for(
                        client.chat.completions.create(**request), timeout=settings.timeout_s
                    )
                return self._answer(response, json_mode)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is classified; nothing escapes unredacted
                failure = classify(exc, settings.timeout_s)
            failure.message = redact(failure.message, api_key)
            if not failure.retryable or attempt >= settings.max_retries:
                tries = f"after {attempt + 1} attempt(s)" if failure.retryable else "not retried"
                raise StageError(
                    f"{self.label} at {base_url or 'api.openai.com'}: {failure.message} ({tries})",
                    error_type=failure.error_type,
                )
            delay = backoff_delay(attempt, settings.backoff_s, settings.max_backoff_s, failure.retry_after)
            if delay is None:
                raise StageError(
                    f"{self.label} at {base_url or 'api.openai.com'}: {failure.message}; the server asks to retry "
                    f"after {failure.retry_after:g} s, longer than max_backoff_s={settings.max_backoff_s:g} "
                    "(raise max_backoff_s to wait that long)",
                    error_type=failure.error_type,
                )
            attempt += 1
            self._usage()["retries"] += 1
            log.warning(
                "%s: record %s: %s; retry %d/%d in %.2f s",
                self.label,
                record_id,
                failure.message,
                attempt,
                settings.max_retries,
                delay,
            )
            await asyncio.sleep(delay)

    async def agenerate(self, chats: list[list[dict[str, str]]], request: APIRequest) -> list[Generation | StageError]:
        """One request per chat, all in flight at once (the semaphore bounds them); an error per failed one.

        Tokens are counted into the usage by `_answer` on every attempt (a retried answer was paid
        for too), so the Generations carry none.
        """

        async def one(messages: list[dict[str, str]], record_id: str) -> Generation | StageError:
            try:
                text = await self.complete(
                    request.settings,
                    {**request.body, "messages": messages},
                    base_url=request.base_url,
                    api_key=request.api_key,
                    json_mode=request.json_mode,
                    record_id=record_id,
                )
            except StageError as error:
                return error
            return Generation([text], tokens_in=0, tokens_out=0)

        return list(await asyncio.gather(*(one(m, r) for m, r in zip(chats, request.record_ids, strict=True))))

    def generate(self, chats: list[list[dict[str, str]]], request: APIRequest) -> list[Generation | StageError]:
        """The same from a plain thread (the client and slots follow the loop, see the class docstring)."""
        return asyncio.run(self.agenerate(chats, request))

    def load(self) -> None:
        """Nothing to load: the client is built on the first call, on the loop that makes it."""

    def close(self) -> None:
        self.forget()

    def _answer(self, response: Any, json_mode: bool) -> str:
        usage = getattr(response, "usage", None)
        if usage is not None:
            self._usage()["tokens_in"] += usage.prompt_tokens or 0
            self._usage()["tokens_out"] += usage.completion_tokens or 0
        choices = getattr(response, "choices", None)
        if not choices or choices[0].message is None:
            raise StageError(f"the server answered without a choice: {str(response)[:200]}", error_type="BadResponse")
        text = choices[0].message.content
        if text is None:
            refusal = getattr(choices[0].message, "refusal", None)
            raise StageError(f"the answer has no content (refusal: {refusal!r})", error_type="EmptyAnswer")
        return check_json_object(text) if json_mode else text

    def forget(self) -> None:
        """Drop the client and the slots (their connections close with the event loop that owns them)."""
        self._client = self._client_key = self._slots = self._slots_key = None
