"""
The load generator: raw HTTP/1.1 over keep-alive loopback sockets, cheap enough that the client
is never what limits a measurement, and the same code for the direct and the proxied side.

`Connection` is a blocking client for sequential requests and streams; `hammer` runs N
concurrent keep-alive clients on one asyncio loop for a fixed time.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

LOOPBACK = "127.0.0.1"


def post(path: str, body: dict[str, Any], port: int) -> bytes:
    """
    The bytes of a keep-alive ``POST`` of a JSON body.
    """
    data = json.dumps(body).encode("utf-8")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: */*\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode("ascii") + data


def get(path: str, port: int) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {LOOPBACK}:{port}\r\n\r\n".encode("ascii")


class ResponseParser:
    """
    An incremental parser of one HTTP/1.1 response delimited by ``Content-Length`` or chunked.

    :param keep_body: keep the body (otherwise only count its bytes).
    :param parse_chunks: decode a chunked body; otherwise only look for its last chunk (the
        client then costs the same however the server splits the body into chunks, and counts
        the framing in ``body_bytes``; nothing may follow the response).
    :ivar rest: bytes received after the end of the response.
    """

    def __init__(self, keep_body: bool = True, parse_chunks: bool = True) -> None:
        self.keep_body = keep_body
        self.parse_chunks = parse_chunks
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.body_bytes = 0
        self.done = False
        self.rest = b""
        self._buf = bytearray()
        self._length: int | None = None
        self._chunked = False

    def feed(self, data: bytes) -> bool:
        """
        Take more bytes; returns whether the response is complete.
        """
        self._buf += data
        if self.status is None:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return False
            lines = bytes(self._buf[:end]).decode("latin-1").split("\r\n")
            self.status = int(lines[0].split(" ", 2)[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            del self._buf[: end + 4]
            self._chunked = "chunked" in self.headers.get("transfer-encoding", "").lower()
            if not self._chunked:
                self._length = int(self.headers.get("content-length", "0"))
        if self._chunked:
            return self._chunks() if self.parse_chunks else self._last_chunk()
        assert self._length is not None
        if len(self._buf) < self._length:
            return False
        self._take(bytes(self._buf[: self._length]))
        self.rest = bytes(self._buf[self._length:])
        self.done = True
        return True

    def _take(self, data: bytes) -> None:
        self.body_bytes += len(data)
        if self.keep_body:
            self.body += data

    def _last_chunk(self) -> bool:
        # Keeps the last 7 bytes, which may be the start of the end; counts each byte once.
        self.done = self._buf.endswith(b"\r\n0\r\n\r\n")
        keep = 0 if self.done else min(7, len(self._buf))
        self.body_bytes += len(self._buf) - keep
        del self._buf[: len(self._buf) - keep]
        return self.done

    def _chunks(self) -> bool:
        buf = self._buf
        pos = 0
        while True:
            line_end = buf.find(b"\r\n", pos)
            if line_end < 0:
                break
            size = int(bytes(buf[pos:line_end]).split(b";")[0], 16)
            if size == 0:
                if len(buf) < line_end + 4:
                    break
                self.rest = bytes(buf[line_end + 4:])
                self.done = True
                return True
            if len(buf) < line_end + 2 + size + 2:
                break
            self._take(bytes(buf[line_end + 2: line_end + 2 + size]))
            pos = line_end + 2 + size + 2
        del buf[:pos]
        return False


class Response:
    """
    What one request got, with its client-side timings (``time.perf_counter`` seconds).
    """

    def __init__(self, parser: ResponseParser, sent: float, first_byte: float, last_byte: float) -> None:
        self.status = parser.status
        self.headers = parser.headers
        self.body = bytes(parser.body)
        self.body_bytes = parser.body_bytes
        self.ttfb = first_byte - sent
        self.total = last_byte - sent

    def json(self) -> Any:
        return json.loads(self.body)


class _ClosedBeforeAnswer(ConnectionError):
    pass


class Connection:
    """
    One blocking keep-alive connection to ``127.0.0.1:port``.
    """

    def __init__(self, port: int, timeout: float = 120.0) -> None:
        self.port = port
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self._rest = b""
        self._connect()

    def _connect(self) -> socket.socket:
        self.sock = socket.create_connection((LOOPBACK, self.port), timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._rest = b""
        return self.sock

    def request(self, raw: bytes, keep_body: bool = True, parse_chunks: bool = True) -> Response:
        """
        Send one request (from `post` or `get`) and read its whole response.

        The connection is opened again when the server closed it after its last answer
        (``Connection: close``, as llama-server does every 100 requests), and when a connection
        that sat idle turns out to be closed before any byte of the answer (llama-server closes
        one idle for 5 s); the request is then sent again, and timed from then.
        """
        reused = self.sock is not None
        try:
            return self._exchange(raw, keep_body, parse_chunks)
        except _ClosedBeforeAnswer:
            if not reused:
                raise
            self.close()
            return self._exchange(raw, keep_body, parse_chunks)

    def _exchange(self, raw: bytes, keep_body: bool, parse_chunks: bool) -> Response:
        parser = ResponseParser(keep_body, parse_chunks)
        sent = time.perf_counter()
        sock = self.sock or self._connect()
        first = None
        try:
            sock.sendall(raw)
            done = parser.feed(self._rest) if self._rest else False
            while not done:
                data = sock.recv(262144)
                if first is None:
                    first = time.perf_counter()
                if not data:
                    raise ConnectionResetError("closed")
                done = parser.feed(data)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.close()
            if parser.status is None and not parser._buf:
                raise _ClosedBeforeAnswer(f"127.0.0.1:{self.port} closed the connection") from e
            raise ConnectionError(f"127.0.0.1:{self.port} closed the connection mid-response") from e
        last = time.perf_counter()
        self._rest = parser.rest
        if parser.headers.get("connection", "").lower() == "close":
            self.close()
        return Response(parser, sent, first if first is not None else last, last)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _client(port: int, raw: bytes, deadline: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        loop = asyncio.get_running_loop()
        rest = b""
        while loop.time() < deadline:
            if writer.is_closing():
                reader, writer = await asyncio.open_connection(LOOPBACK, port)
                rest = b""
            parser = ResponseParser(keep_body=False)
            sent = time.perf_counter()
            writer.write(raw)
            done = parser.feed(rest) if rest else False
            while not done:
                data = await reader.read(262144)
                if not data:
                    raise ConnectionError(f"127.0.0.1:{port} closed the connection mid-response")
                done = parser.feed(data)
            latencies.append(time.perf_counter() - sent)
            rest = parser.rest
            if parser.status != 200:
                errors.append(parser.status or 0)
            if parser.headers.get("connection", "").lower() == "close":
                writer.close()
    finally:
        writer.close()


def hammer(port: int, raw: bytes, clients: int, seconds: float) -> tuple[list[float], list[int], float]:
    """
    ``clients`` keep-alive connections each sending ``raw`` back to back for ``seconds``.

    :returns: every request's latency, the statuses of the non-200 answers, and the wall time
        until the last answer.
    """
    latencies: list[float] = []
    errors: list[int] = []

    async def run() -> float:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        deadline = loop.time() + seconds
        await asyncio.gather(*(_client(port, raw, deadline, latencies, errors) for _ in range(clients)))
        return time.perf_counter() - started

    elapsed = asyncio.run(run())
    return latencies, errors, elapsed
