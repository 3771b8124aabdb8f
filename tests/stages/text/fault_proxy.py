"""A real HTTP proxy on 127.0.0.1 that sits between a stage and a real server and injects
scripted faults, one per request, in arrival order (then passes everything through).

    proxy.plan(Fault.status(429, retry_after="1"), Fault.passthrough())

Kinds: `status` (answer with that status and an OpenAI-style error body, never reaching the
server), `slow` (wait, then forward), `hang` (wait, then close without answering), `drop`
(close the connection at once), `trickle` (forward, then send the answer one byte per
`delay_s`), `bad_json` (forward, then replace the answer's content with broken JSON),
`json` (forward, then wrap the content as a JSON object, as a JSON-mode server would),
`echo_auth` (a hostile 401 that quotes the request's Authorization header back).

Every request is logged (arrival and finish time, fault, request body and headers), and the
most requests seen in flight at once is kept.
"""

from __future__ import annotations

import http.client
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Fault:
    kind: str = "pass"
    status: int = 200
    message: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    @classmethod
    def passthrough(cls) -> Fault:
        return cls("pass")

    @classmethod
    def error(cls, status: int, message: str = "injected failure", retry_after: str | None = None) -> Fault:
        return cls("status", status, message, {"Retry-After": retry_after} if retry_after is not None else {})

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        return cls("slow", delay_s=delay_s)

    @classmethod
    def hang(cls, delay_s: float) -> Fault:
        return cls("hang", delay_s=delay_s)

    @classmethod
    def drop(cls) -> Fault:
        return cls("drop")

    @classmethod
    def trickle(cls, delay_s: float) -> Fault:
        return cls("trickle", delay_s=delay_s)

    @classmethod
    def bad_json(cls) -> Fault:
        return cls("bad_json")

    @classmethod
    def json(cls) -> Fault:
        return cls("json")

    @classmethod
    def echo_auth(cls) -> Fault:
        return cls("echo_auth", 401)


@dataclass
class Seen:
    started: float
    fault: str
    body: dict
    headers: dict[str, str]
    finished: float = 0.0
    status: int | None = None


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self._plan: list[Fault] = []
        self.default = Fault.passthrough()
        self.log: list[Seen] = []
        self.inflight = 0
        self.max_inflight = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def plan(self, *faults: Fault, default: Fault | None = None) -> None:
        with self._lock:
            self._plan = list(faults)
            self.log.clear()
            self.max_inflight = 0
            if default is not None:
                self.default = default

    def _next(self) -> Fault:
        with self._lock:
            return self._plan.pop(0) if self._plan else self.default

    def _enter(self, seen: Seen) -> None:
        with self._lock:
            self.log.append(seen)
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)

    def _leave(self, seen: Seen, status: int | None) -> None:
        with self._lock:
            self.inflight -= 1
            seen.finished = time.monotonic()
            seen.status = status

    def forward(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection(*self.upstream, timeout=60)
        try:
            conn.request(method, path, body=body or None, headers=headers)
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()


def _rewrite_content(payload: bytes, rewrite) -> bytes:
    data = json.loads(payload)
    message = data["choices"][0]["message"]
    message["content"] = rewrite(message.get("content") or "")
    return json.dumps(data).encode()


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, headers: dict[str, str], body: bytes, per_byte_s: float = 0.0) -> None:
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if per_byte_s:
                for i in range(len(body)):
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                    time.sleep(per_byte_s)
            else:
                self.wfile.write(body)

        def _hard_close(self) -> None:
            self.close_connection = True
            try:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def do_GET(self) -> None:
            status, headers, body = proxy.forward("GET", self.path, b"", {})
            self._send(status, headers, body)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            fault = proxy._next()
            seen = Seen(
                time.monotonic(), fault.kind, json.loads(raw or b"{}"), {k.lower(): v for k, v in self.headers.items()}
            )
            proxy._enter(seen)
            status = None
            try:
                status = self._act(fault, raw)
            except OSError:  # the client gave up (its timeout), or the server is gone at teardown
                self.close_connection = True
            finally:
                proxy._leave(seen, status)

        def _act(self, fault: Fault, raw: bytes) -> int | None:
            upstream_headers = {"Content-Type": "application/json"}
            if self.headers.get("Authorization"):
                upstream_headers["Authorization"] = self.headers["Authorization"]
            if fault.kind == "status":
                body = {"error": {"message": fault.message, "type": "injected", "code": fault.status}}
                self._send(
                    fault.status, {"Content-Type": "application/json", **fault.headers}, json.dumps(body).encode()
                )
                return fault.status
            if fault.kind == "echo_auth":
                quoted = self.headers.get("Authorization", "")
                body = {"error": {"message": f"Incorrect API key provided: {quoted}", "type": "invalid_request_error"}}
                self._send(401, {"Content-Type": "application/json"}, json.dumps(body).encode())
                return 401
            if fault.kind == "drop":
                self._hard_close()
                return None
            if fault.kind == "hang":
                time.sleep(fault.delay_s)
                self._hard_close()
                return None
            if fault.kind == "slow":
                time.sleep(fault.delay_s)
            status, headers, body = proxy.forward("POST", self.path, raw, upstream_headers)
            if status == 200 and fault.kind == "bad_json":
                body = _rewrite_content(body, lambda text: '{"caption": "unterminated')
            elif status == 200 and fault.kind == "json":
                body = _rewrite_content(body, lambda text: json.dumps({"text": text}))
            self._send(status, headers, body, per_byte_s=fault.delay_s if fault.kind == "trickle" else 0.0)
            return status

    return Handler
