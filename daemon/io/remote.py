"""Remote media: rows whose video/image field is an http(s):// or s3:// URL.

Allow-list first: `daemon.remote.allow` (URL prefixes or fnmatch globs) is empty by default,
so a meta file cannot make the daemon fetch an arbitrary address (a loopback service, a
cloud metadata endpoint); a refused URL is the row's error line, naming the rule. Redirects
are followed only to allowed URLs.

An allowed URL is fetched before the record enters the first step, into a bounded local
cache (`cache_dir`, least recently used files evicted past `cache_max_gb`), with at most
`max_in_flight` fetches at once. 5xx answers, timeouts and broken connections are retried
with backoff (`retries` times); a server still failing after that is a dead endpoint, which
the failure contract calls transient: intake pauses (`reelflow_paused{reason="endpoint"}`)
and the fetch is asked again until it passes, so no record is failed for it. 404 and 403 are
the record's own problem: an error line at once. The stage then reads the cached local file;
the result line keeps the URL the row gave.
"""

from __future__ import annotations

import asyncio
import errno
import fnmatch
import hashlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from urllib.parse import urljoin, urlsplit

from daemon.config import RemoteSection

log = logging.getLogger(__name__)

SCHEMES = ("http://", "https://", "s3://")
MAX_REDIRECTS = 5


def is_remote(value: object) -> bool:
    return isinstance(value, str) and value.startswith(SCHEMES)


def allowing_rule(url: str, allow: list[str]) -> str | None:
    """The allow-list entry that admits `url` (a prefix, or a glob when it has * ? or [), or None."""
    for rule in allow:
        if any(c in rule for c in "*?[") and fnmatch.fnmatchcase(url, rule):
            return rule
        if url.startswith(rule):
            return rule
    return None


def refusal(url: str, allow: list[str]) -> str:
    if not allow:
        return (
            f"remote URL {url!r} refused: daemon.remote.allow is empty, so no URL may be fetched; "
            "add its prefix (e.g. 'https://media.example.com/clips/') to daemon.remote.allow"
        )
    return f"remote URL {url!r} refused: it matches no entry of daemon.remote.allow {allow}; add its prefix there"


class RemoteFetchError(Exception):
    """The URL cannot be had: `kind` is RemoteNotFound, RemoteForbidden, RemoteRefused or RemoteUnavailable."""

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


class RemoteUnavailable(ConnectionError):
    """The server kept failing (5xx, timeouts) past `retries`: a dead endpoint, transient by the
    failure contract (runtime/failures.py): intake pauses and the fetch is asked again later;
    the record is not failed for it."""


class _Retry(Exception):
    """A failure that may pass (5xx, timeout, connection): try again."""


class MediaCache:
    """Fetches URLs into `folder`, one file per URL, evicting the least recently used past the cap."""

    def __init__(self, settings: RemoteSection, folder: Path):
        self.settings = settings
        self.folder = folder
        self._http = None
        self._s3 = None
        # Its own threads: the loop's default pool has only cores + 4, fewer than max_in_flight may ask.
        self._threads = ThreadPoolExecutor(settings.max_in_flight, thread_name_prefix="remote-fetch")
        self._size: int | None = None  # bytes in the cache, counted on first use, then kept up to date
        self._size_lock = threading.Lock()
        self.fetched = 0  # downloads (cache misses)

    def path_for(self, url: str) -> Path:
        suffix = PurePosixPath(urlsplit(url).path).suffix[:10]
        return self.folder / f"{hashlib.sha256(url.encode()).hexdigest()[:24]}{suffix}"

    async def fetch(self, url: str) -> Path:
        return await asyncio.get_running_loop().run_in_executor(self._threads, self.fetch_blocking, url)

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)
        if self._http is not None:
            self._http.close()

    def fetch_blocking(self, url: str) -> Path:
        target = self.path_for(url)
        if target.is_file():
            os.utime(target)  # recently used: evicted last
            return target
        self.folder.mkdir(parents=True, exist_ok=True)
        attempts = self.settings.retries + 1
        for attempt in range(attempts):
            try:
                self._download(url, target)
                break
            except _Retry as passing:
                if attempt + 1 == attempts:
                    raise RemoteUnavailable(
                        f"{url}: {passing} (tried {attempts} times over about {self._backoff_total(attempts):.0f} s; "
                        "raise daemon.remote.retries or timeout_s if the server is slow)"
                    ) from None
                delay = min(30.0, 0.25 * 2**attempt)
                log.warning("fetching %s: %s; retry %d/%d in %.2f s", url, passing, attempt + 1, attempts - 1, delay)
                time.sleep(delay)
        self._added(target)
        return target

    @staticmethod
    def _backoff_total(attempts: int) -> float:
        return sum(min(30.0, 0.25 * 2**n) for n in range(attempts - 1))

    def _download(self, url: str, target: Path) -> None:
        part = target.with_name(f".{target.name}.{os.getpid()}.part")
        try:
            if url.startswith("s3://"):
                self._download_s3(url, part)
            else:
                self._download_http(url, part)
            os.replace(part, target)
        finally:
            part.unlink(missing_ok=True)

    def _download_http(self, url: str, part: Path) -> None:
        import httpx

        if self._http is None:
            self._http = httpx.Client(timeout=self.settings.timeout_s, follow_redirects=False)
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            try:
                with self._http.stream("GET", current) as response:
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308) and "location" in response.headers:
                        following = urljoin(current, response.headers["location"])
                        if allowing_rule(following, self.settings.allow) is None:
                            raise RemoteFetchError(
                                f"{url} redirects to {following}, which daemon.remote.allow does not admit",
                                "RemoteRefused",
                            )
                        current = following
                        continue
                    if status == 404 or status == 410:
                        raise RemoteFetchError(f"{url}: the server answered {status} (not found)", "RemoteNotFound")
                    if status in (401, 403):
                        raise RemoteFetchError(
                            f"{url}: the server answered {status} (access denied); check the URL or its credentials",
                            "RemoteForbidden",
                        )
                    if status >= 500 or status == 429:
                        raise _Retry(f"the server answered {status}")
                    if status >= 400:
                        raise RemoteFetchError(f"{url}: the server answered {status}", "RemoteNotFound")
                    with part.open("wb") as out:
                        for block in response.iter_bytes(1 << 20):
                            out.write(block)
                    return
            except (httpx.TimeoutException, httpx.TransportError) as passing:
                raise _Retry(f"{type(passing).__name__}: {passing}") from None
        raise RemoteFetchError(f"{url}: more than {MAX_REDIRECTS} redirects", "RemoteRefused")

    def _download_s3(self, url: str, part: Path) -> None:
        if self._s3 is None:
            try:
                import s3fs
            except ImportError as missing:
                raise RemoteFetchError(
                    f"{url}: s3:// URLs need s3fs ({missing}); install it with: pip install 'reelflow[remote]'",
                    "MissingDependency",
                ) from None
            timeout = self.settings.timeout_s
            self._s3 = s3fs.S3FileSystem(
                config_kwargs={"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}},
                skip_instance_cache=True,
            )
        try:
            self._s3.get_file(url, str(part))
        except FileNotFoundError:
            raise RemoteFetchError(f"{url}: no such object", "RemoteNotFound") from None
        except PermissionError:
            raise RemoteFetchError(
                f"{url}: access denied; check the bucket policy or credentials", "RemoteForbidden"
            ) from None
        except OSError as passing:  # connection refused, timeouts, 5xx surface as OSError subclasses
            if passing.errno in (errno.ENOSPC, errno.EDQUOT):
                raise  # the cache's own disk is full, not the server down: the runtime waits it out
            raise _Retry(f"{type(passing).__name__}: {passing}") from None
        except Exception as other:  # botocore's own errors (EndpointConnectionError, ClientError 5xx)
            if type(other).__module__.startswith(("botocore", "aiobotocore", "aiohttp")):
                raise _Retry(f"{type(other).__name__}: {other}") from None
            raise

    def _added(self, target: Path) -> None:
        """Count a new file; past the cap, evict the least recently used (never `target`)."""
        cap = self.settings.cache_max_gb * (1 << 30)
        with self._size_lock:
            self.fetched += 1
            if self._size is None:
                self._size = sum(p.stat().st_size for p in self._files())
            else:
                self._size += target.stat().st_size
            if self._size <= cap:
                return
            files = {p: p.stat() for p in self._files()}
            for path in sorted(files, key=lambda p: files[p].st_mtime):
                if self._size <= cap:
                    break
                if path != target:
                    path.unlink(missing_ok=True)
                    self._size -= files[path].st_size

    def _files(self) -> list[Path]:
        return [p for p in self.folder.iterdir() if p.is_file() and not p.name.startswith(".")]
