"""A fault-injecting HTTP proxy for S3 tests: 503 SlowDown, connection resets, 403s.

It sits on 127.0.0.1 between an S3 client (boto3 with ``endpoint_url=proxy.url``,
path-style addressing) and a real S3 server (moto), parses each HTTP/1.1 request on a
kept-alive client connection, and decides its fate with a seeded RNG:

- ``slowdown`` (probability ``p_slowdown``): answered ``503 SlowDown`` with S3's XML
  error body, never forwarded;
- ``reset_before`` / ``reset_mid`` (probability ``p_reset``, half each): the connection
  is reset (SO_LINGER 0: a TCP RST) before any response, or after the response headers
  and part of its body were relayed;
- ``denied``: any request for a path in ``deny`` (``/bucket/key``) gets ``403
  AccessDenied``, every time;
- otherwise it is forwarded and the response relayed whole.

Request bodies may be sized or chunked (pyarrow's aws-chunked uploads); ``Expect:
100-continue`` is answered by the proxy. ``proxy.counts`` tallies requests by fate. Used
as a context manager, or ``close()``::

    with FaultProxy(moto_endpoint, p_slowdown=0.15, p_reset=0.1, seed=1) as proxy:
        storage.read_bytes(url, endpoint_url=proxy.url)
"""

from __future__ import annotations

import collections
import itertools
import random
import socket
import struct
import threading
from urllib.parse import urlsplit

_XML_ERROR = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
              "<Resource>{resource}</Resource><RequestId>fault-{n}</RequestId></Error>")


class FaultProxy:
    def __init__(self, upstream: str, *, p_slowdown: float = 0.0, p_reset: float = 0.0, seed: int = 0,
                 deny: tuple[str, ...] | set[str] = ()):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.p_slowdown, self.p_reset = p_slowdown, p_reset
        self.deny = set(deny)
        self.counts: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._clients: set[socket.socket] = set()
        self._server = socket.socket()
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(64)
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True, name="faultproxy-accept").start()

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._server.close()
        with self._lock:
            clients = list(self._clients)
        for c in clients:
            _close(c)

    @property
    def faults(self) -> int:
        return sum(self.counts[k] for k in ("slowdown", "reset_before", "reset_mid"))

    # ---- per connection ----------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            with self._lock:
                self._clients.add(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True, name="faultproxy-conn").start()

    def _fate(self, path: str) -> str:
        with self._lock:
            self.counts["requests"] += 1
            if path in self.deny:
                fate = "denied"
            else:
                x = self._rng.random()
                if x < self.p_slowdown:
                    fate = "slowdown"
                elif x < self.p_slowdown + self.p_reset:
                    fate = "reset_before" if self._rng.random() < 0.5 else "reset_mid"
                else:
                    fate = "forwarded"
            self.counts[fate] += 1
            return fate

    def _serve(self, client: socket.socket) -> None:
        buf = b""
        try:
            while True:
                head, buf = _read_until(client, buf, b"\r\n\r\n")
                if head is None:
                    return
                method, target = head.split(b" ", 2)[:2]
                headers = _headers(head)
                if headers.get("expect") == "100-continue":
                    # Answer it here (curl, so pyarrow, sends it for bodies > 1 MiB) and
                    # forward the request without it: upstream then sends one final response.
                    client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                    head = b"\r\n".join(line for line in head.split(b"\r\n")
                                         if not line.lower().startswith(b"expect:"))
                if "chunked" in headers.get("transfer-encoding", ""):
                    body, buf = _read_chunked(client, buf)  # pyarrow's uploads (aws-chunked)
                else:
                    body, buf = _read_exact(client, buf, int(headers.get("content-length", "0")))
                path = urlsplit(target.decode("latin-1")).path
                fate = self._fate(path)
                head_only = method == b"HEAD"
                if fate == "denied":
                    client.sendall(_error(403, "Forbidden", "AccessDenied", "Access Denied", path, head_only))
                elif fate == "slowdown":
                    client.sendall(_error(503, "Slow Down", "SlowDown", "Please reduce your request rate.",
                                          path, head_only))
                elif fate == "reset_before":
                    _reset(client)
                    return
                elif not self._forward(client, head + body, head_only, cut=fate == "reset_mid"):
                    return
        except (OSError, ValueError):
            _close(client)
        finally:
            with self._lock:
                self._clients.discard(client)

    def _forward(self, client: socket.socket, request: bytes, head_only: bool, cut: bool) -> bool:
        """Relay one request and its response; False once the client connection is gone."""
        with socket.create_connection(self.upstream, timeout=60) as up:
            up.sendall(request)
            head, rest = _read_until(up, b"", b"\r\n\r\n")
            while head is not None and head.split(b" ", 2)[1].startswith(b"1"):
                head, rest = _read_until(up, rest, b"\r\n\r\n")  # interim 1xx: not relayed
            if head is None:
                raise OSError("upstream closed without a response")
            status = int(head.split(b" ", 2)[1])
            headers = _headers(head)
            if head_only or status in (204, 304):
                length: int | None = 0
            elif "content-length" in headers:
                length = int(headers["content-length"])
            elif "chunked" in headers.get("transfer-encoding", ""):
                body, _ = _read_chunked(up, rest)
                rest, length = body, len(body)  # relayed raw, chunk framing and all
            else:
                length = None  # until the server closes
            if cut:
                # Half the body, then RST; with no body to cut, RST without a response (the
                # server did the work, the client never hears of it).
                if length:
                    body, _ = _read_exact(up, rest, max(1, length // 2))
                    client.sendall(head + body)
                _reset(client)
                return False
            client.sendall(head)
            if length is None:
                client.sendall(rest)
                while data := up.recv(1 << 16):
                    client.sendall(data)
                _close(client)
                return False
            sent = min(len(rest), length)
            client.sendall(rest[:sent])
            while sent < length:
                data = up.recv(min(1 << 16, length - sent))
                if not data:
                    raise OSError("upstream closed mid-body")
                client.sendall(data)
                sent += len(data)
        return True


def _read_until(sock: socket.socket, buf: bytes, marker: bytes) -> tuple[bytes | None, bytes]:
    while marker not in buf:
        data = sock.recv(1 << 16)
        if not data:
            return None, b""
        buf += data
    end = buf.index(marker) + len(marker)
    return buf[:end], buf[end:]


def _read_exact(sock: socket.socket, buf: bytes, n: int) -> tuple[bytes, bytes]:
    while len(buf) < n:
        data = sock.recv(1 << 16)
        if not data:
            raise OSError("connection closed mid-body")
        buf += data
    return buf[:n], buf[n:]


def _read_chunked(sock: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    """A chunked body, raw (sizes, data, trailers), as it came; and what follows it."""
    out = b""
    while True:
        line, buf = _read_until(sock, buf, b"\r\n")
        if line is None:
            raise OSError("connection closed mid-body")
        out += line
        if int(line.split(b";")[0].strip(), 16) == 0:
            while True:  # trailers, up to an empty line
                line, buf = _read_until(sock, buf, b"\r\n")
                if line is None:
                    raise OSError("connection closed in the trailers")
                out += line
                if line == b"\r\n":
                    return out, buf
        data, buf = _read_exact(sock, buf, int(line.split(b";")[0].strip(), 16) + 2)
        out += data


def _headers(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, sep, value = line.partition(":")
        if sep:
            out[name.strip().lower()] = value.strip().lower()
    return out


_error_ids = itertools.count(1)


def _error(status: int, reason: str, code: str, message: str, resource: str, head_only: bool) -> bytes:
    """An S3-style error response (XML body; headers only for a HEAD request)."""
    n = next(_error_ids)
    body = _XML_ERROR.format(code=code, message=message, resource=resource, n=n).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {0 if head_only else len(body)}\r\nx-amz-request-id: fault-{n}\r\n\r\n")
    return head.encode() + (b"" if head_only else body)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER on, timeout 0): the peer sees 'connection reset'."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
