"""Docker's plugin protocol over HTTP/1.1 on a unix socket (one thread per connection)."""

from __future__ import annotations

import functools
import json
import logging
import re
import socket
import socketserver
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler
from typing import IO, Any, Callable, Dict, Optional, Union, cast
from urllib.parse import parse_qs, urlsplit

from .driver import DiffWriter, Driver
from .errors import DriverError
from .layout import LayerId, validate_id
from .memory import RELEASE_AFTER_BYTES, release_free_memory
from .volumes import VOLUME_ROUTES, Volumes, implements

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
READ_CHUNK = 1 << 20  # the most one read of a request body asks of the connection

# What a request may be (issue 11). A request outside these is answered 4xx, naming why.
# Every call but ApplyDiff carries JSON, a few hundred bytes from dockerd: 1 MiB is ample,
# and nothing larger is read into memory.
MAX_JSON_BODY = 1 << 20
# A Content-Length or chunk size: what fits in an int64, as Go's net/http (dockerd) reads it.
MAX_BODY_LENGTH = (1 << 63) - 1
MAX_LINE = 4096  # a chunk-size line or a trailer line
MAX_TRAILERS = 100  # as http.client's limit on header lines
_DECIMAL = re.compile(r"[0-9]{1,19}")  # no sign, no spaces, no '_' (which int() accepts)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")  # no sign, no '0x', no '_'

# Connections and their timeouts (issue 11). Each connection has a thread; only root can
# reach the socket (mode 0600), so these are against stuck or broken clients, which must
# not pin threads without end.
#
# Connections served at once. dockerd's plugin client has one connection per call in
# flight (pulls register layers one by one per image) and keeps two idle between calls.
# A connection beyond this waits in the listen backlog, not accepted, until one closes (an
# idle one does within REQUEST_TIMEOUT): dockerd's call is delayed, never refused.
MAX_CONNECTIONS = 256
LIMIT_LOG_INTERVAL = 60  # seconds: while at the limit, it is logged once a minute
# Seconds without a byte while a connection waits for its next request, and while a
# request's line, headers and JSON body arrive: dockerd sends a call at once, and its
# pool opens a new connection when we have closed an idle one.
REQUEST_TIMEOUT = 30
# Seconds without a byte in ApplyDiff's body or while Diff's answer is taken. Neither
# comes from the registry directly: a pull downloads a layer into a file before applying
# it, so a network stall does not pause the body. What streams at a client's pace is
# `docker import` (a URL, or the client's upload, straight into ApplyDiff) and `docker
# push`/`save` (Diff read as fast as the registry or the client takes it): ten minutes
# outlasts a stall of those; a body idle for longer has a client that went away without
# closing, and the layer is left incomplete (dockerd removes it).
STREAM_TIMEOUT = 600


class RequestError(DriverError):
    """A request the server cannot take as sent (malformed, cut short, too large): answered
    with the 4xx `status`, its message naming the problem."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _Body:
    """A request body being read. Once it has failed (cut short, malformed) it stays
    failed: `error` says why, and every later read raises that again without waiting on
    the connection, whose rest cannot be read."""

    def __init__(self, raw: IO[bytes], idle: Optional[float] = None) -> None:
        self._raw = raw
        self._idle = idle  # the connection's timeout (seconds), for the message
        self.error: Optional[RequestError] = None

    def _fail(self, message: str, status: int = 400) -> RequestError:
        self.error = RequestError(message, status)
        return self.error

    def _recv(self, n: int, line: bool = False) -> bytes:
        try:
            return self._raw.readline(n) if line else self._raw.read(n)
        except socket.timeout:
            within = f"for {self._idle:g} s" if self._idle else "within the timeout"
            raise self._fail(f"request body: nothing arrived {within} (the client stalled "
                             "or went away)", 408) from None
        except OSError as e:
            raise self._fail(f"request body could not be read: {e}") from None

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def read(self, n: int = -1) -> bytes:
        raise NotImplementedError

    @property
    def received(self) -> int:
        """Bytes of the body read so far."""
        raise NotImplementedError

    def drain(self) -> None:
        while self.read(READ_CHUNK):
            pass


class ChunkedReader(_Body):
    """A file-like reader of an HTTP/1.1 chunked body, at most `limit` bytes of data if
    given. Framing is checked as strictly as Go writes it: a chunk size is hexadecimal
    digits, its data is followed by CRLF (anything else means the sizes do not match the
    data, and the rest of the connection cannot be trusted)."""

    def __init__(self, raw: IO[bytes], limit: Optional[int] = None,
                 idle: Optional[float] = None) -> None:
        super().__init__(raw, idle)
        self._limit = limit
        self._total = 0
        self._left = 0
        self._done = False

    def _line(self, what: str, ended: str) -> bytes:
        line = self._recv(MAX_LINE + 1, line=True)
        if not line.endswith(b"\n"):
            if len(line) > MAX_LINE:
                raise self._fail(f"{what} is longer than {MAX_LINE} bytes")
            raise self._fail(ended)
        return line

    def _next_chunk(self) -> None:
        line = self._line("a chunk-size line",
                          "request body ended before the last chunk (client went away?)")
        size = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size) or int(size, 16) > MAX_BODY_LENGTH:
            raise self._fail(f"malformed chunk header {line[:40]!r}: a chunk size is "
                             f"hexadecimal digits, at most {MAX_BODY_LENGTH:x}")
        self._left = int(size, 16)
        if self._left == 0:
            for _ in range(MAX_TRAILERS + 1):
                if self._line("a trailer line", "request body ended inside its trailers "
                              "(client went away?)") in (b"\r\n", b"\n"):
                    self._done = True
                    return
            raise self._fail(f"request body has more than {MAX_TRAILERS} trailer lines")

    @property
    def received(self) -> int:
        return self._total

    def read(self, n: int = -1) -> bytes:
        self._check()
        out = bytearray()
        while not self._done and (n < 0 or len(out) < n):
            if self._left == 0:
                self._next_chunk()
                continue
            want = min(self._left, READ_CHUNK if n < 0 else n - len(out))
            data = self._recv(want)
            if not data:
                raise self._fail("request body ended inside a chunk (client went away?)")
            self._total += len(data)
            if self._limit is not None and self._total > self._limit:
                raise self._fail(f"request body is larger than {self._limit} bytes, the most "
                                 "this call takes", 413)
            out += data
            self._left -= len(data)
            if self._left == 0:
                end = self._recv(3, line=True)
                if end not in (b"\r\n", b"\n"):
                    raise self._fail(
                        "request body ended inside a chunk (client went away?)" if not end
                        else "chunk data is not followed by CRLF: the chunk sizes do not "
                        "match the data")
        return bytes(out)


class LengthReader(_Body):
    """A body of Content-Length bytes. Fewer is an error, never a shorter body: a client
    that goes away mid-body must not have what it sent taken as all of it (a layer tar
    cut at an entry boundary reads as a complete, smaller layer)."""

    def __init__(self, raw: IO[bytes], length: int, idle: Optional[float] = None) -> None:
        super().__init__(raw, idle)
        self._length = self._left = length

    @property
    def received(self) -> int:
        return self._length - self._left

    def read(self, n: int = -1) -> bytes:
        self._check()
        if self._left <= 0:
            return b""
        want = self._left if n < 0 else min(n, self._left)
        out = bytearray()
        while len(out) < want:
            data = self._recv(min(want - len(out), READ_CHUNK))
            if not data:
                got = self._length - self._left
                raise self._fail(f"request body ended after {got} of its {self._length} bytes "
                                 "(Content-Length): the client went away or sent less")
            out += data
            self._left -= len(data)
        return bytes(out)


class ChunkedWriter:
    """Writes a streamed response body with chunked transfer encoding."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.sent = 0  # bytes of data written

    def write(self, data: bytes) -> int:
        if data:
            self._raw.write(b"%x\r\n" % len(data))
            self._raw.write(data)
            self._raw.write(b"\r\n")
            self.sent += len(data)
        return len(data)

    def flush(self) -> None:
        self._raw.flush()

    def close(self) -> None:
        self._raw.write(b"0\r\n\r\n")
        self._raw.flush()


class Request:
    """One plugin call: its query, its body, and its fields, checked as they are read
    (layer ids are validated here, once, where they enter the daemon)."""

    def __init__(self, method: str, query: str, body: _Body) -> None:
        self.method = method
        self.query = parse_qs(query)
        self.body = body
        self._json: Optional[Dict[str, Any]] = None
        self._empty = False

    def json(self) -> Dict[str, Any]:
        if self._json is None:
            raw = self.body.read(MAX_JSON_BODY + 1)
            if len(raw) > MAX_JSON_BODY:
                raise RequestError(f"{self.method}: request body is larger than "
                                   f"{MAX_JSON_BODY} bytes, the most a call's JSON may be", 413)
            self._empty = not raw.strip()
            try:
                doc = json.loads(raw) if raw.strip() else {}
            except ValueError as e:
                raise RequestError(f"{self.method}: request body is not JSON ({e})") from None
            except RecursionError:
                raise RequestError(f"{self.method}: request body nests JSON too deeply") \
                    from None
            if not isinstance(doc, dict):
                raise RequestError(f"{self.method}: request body must be a JSON object, not "
                                   f"{_json_type(doc)}")
            self._json = doc
        return self._json

    def text(self, key: str) -> str:
        """A string field ("" when absent or null)."""
        value = self.json().get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise RequestError(f"{self.method}: request field {key} must be a string, not "
                               f"{_json_type(value)}")
        return value

    def optional(self, key: str, kind: type) -> Any:
        """A field that is absent, null, or of `kind` (dict: a JSON object, list: an array)."""
        value = self.json().get(key)
        if value is not None and not isinstance(value, kind):
            raise RequestError(f"{self.method}: request field {key} must be "
                               f"{_json_type(kind())} or null, not {_json_type(value)}")
        return value

    def layer(self, key: str = "ID") -> LayerId:
        value = self.text(key)
        if not value and self._empty:
            # dockerd's plugin client retries a call whose connection broke (the driver
            # was killed or restarted mid-call) re-reading the buffer the first try drained
            # (moby pkg/plugins callWithRetry, moby/moby#33412): the retry has no body.
            raise DriverError(f"{self.method}: the request has no body: dockerd re-sent a "
                              "call whose first try the driver's restart cut off (moby/moby"
                              "#33412); the first try may have been carried out")
        return self._checked(value, "layer id")

    def parent(self, key: str = "Parent") -> Optional[LayerId]:
        value = self.text(key)
        return self._checked(value, "parent id") if value else None

    def query_layer(self, key: str) -> Optional[LayerId]:
        value = (self.query.get(key) or [""])[0]
        return self._checked(value, f"{key} in the query") if value else None

    def _checked(self, value: str, what: str) -> LayerId:
        try:
            return validate_id(value, what)
        except ValueError as e:
            raise DriverError(f"{self.method}: {e}") from None


def _json_type(value: object) -> str:
    """What a JSON value is, as a message names it."""
    if isinstance(value, bool):
        return "true/false"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


Result = Union[Dict[str, Any], DiffWriter]
Route = Callable[[Driver, Request], Result]


def _done(action: Callable[[], object]) -> Dict[str, Any]:
    action()
    return {}


def _exists(d: Driver, r: Request) -> Dict[str, Any]:
    try:
        layer = r.layer()
    except RequestError:
        raise  # not a request dockerd sends
    except DriverError:
        return {"Exists": False}  # a name that can never be a layer
    return {"Exists": d.exists(layer)}


def _apply_diff(d: Driver, r: Request) -> Dict[str, Any]:
    layer = r.query_layer("id")
    if layer is None:
        raise DriverError("ApplyDiff: the query names no layer (id=...)")
    # The body is read as a byte stream (read(n)), all that apply_diff asks of it.
    return {"Size": d.apply_diff(layer, r.query_layer("parent"), cast(IO[bytes], r.body))}


# The GraphDriver calls; the VolumeDriver calls are volumes.VOLUME_ROUTES, and
# Plugin.Activate names the faces a server has (PluginServer.routes).
ROUTES: Dict[str, Route] = {
    "GraphDriver.Init": lambda d, r: _done(lambda: d.init(
        r.text("Home"), r.optional("Opts", list), r.optional("UIDMaps", list),
        r.optional("GIDMaps", list))),
    "GraphDriver.Capabilities": lambda d, r: {"Capabilities": {"ReproducesExactDiffs": False}},
    "GraphDriver.Create": lambda d, r: _done(lambda: d.create(
        r.layer(), r.parent(), r.text("MountLabel"), r.optional("StorageOpt", dict),
        read_write=False)),
    "GraphDriver.CreateReadWrite": lambda d, r: _done(lambda: d.create(
        r.layer(), r.parent(), r.text("MountLabel"), r.optional("StorageOpt", dict),
        read_write=True)),
    "GraphDriver.Remove": lambda d, r: _done(lambda: d.remove(r.layer())),
    "GraphDriver.Get": lambda d, r: {"Dir": d.get(r.layer(), r.text("MountLabel"))},
    "GraphDriver.Put": lambda d, r: _done(lambda: d.put(r.layer())),
    "GraphDriver.Exists": _exists,
    "GraphDriver.Status": lambda d, r: {"Status": d.status()},
    "GraphDriver.GetMetadata": lambda d, r: {"Metadata": d.metadata(r.layer())},
    "GraphDriver.Cleanup": lambda d, r: _done(d.cleanup),
    "GraphDriver.Diff": lambda d, r: d.open_diff(r.layer(), r.parent()),
    "GraphDriver.Changes": lambda d, r: {
        "Changes": [c.to_json() for c in d.changes(r.layer(), r.parent())]
    },
    "GraphDriver.DiffSize": lambda d, r: {"Size": d.diff_size(r.layer(), r.parent())},
    "GraphDriver.ApplyDiff": _apply_diff,
}
# Calls whose body is data, streamed to the call as it arrives (a layer tar, as large as
# the layer), not JSON.
STREAMED_BODIES = frozenset({"GraphDriver.ApplyDiff"})


def _at_least_http_1_0(version: str) -> bool:
    """Whether `version` (a request's "HTTP/x.y", as http.server has checked it) is 1.0 or
    later; False for anything else."""
    m = re.fullmatch(r"HTTP/([0-9]+)\.([0-9]+)", version)
    return m is not None and (int(m[1]), int(m[2])) >= (1, 0)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: PluginServer
    _moved = 0  # bytes of the call's body and its answer (do_POST counts)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        log.debug("http: " + format, *args)

    def log_error(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib name)
        # An idle connection closed after REQUEST_TIMEOUT is routine; anything else is not.
        (log.warning if self.raw_requestline else log.debug)("http: " + format, *args)

    def handle_one_request(self) -> None:
        self.raw_requestline = b""  # still empty if the connection times out idle
        self._moved = 0
        # Each request starts with REQUEST_TIMEOUT (the last call may have set another).
        self.connection.settimeout(REQUEST_TIMEOUT)
        try:
            super().handle_one_request()
        finally:
            if self._moved >= RELEASE_AFTER_BYTES:
                # After the answer is sent: only this connection's next call, and an
                # allocation in another thread, can wait for it (0.2-0.7 ms).
                release_free_memory()

    def address_string(self) -> str:
        return "unix"

    # ---------------------------------------------------------------- responses

    def _json(self, body: Dict[str, Any], status: int = 200,
              headers: Optional[Dict[str, str]] = None) -> None:
        data = (json.dumps(body) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", CONTENT_TYPE)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:  # tell a keep-alive client not to reuse this connection
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self._moved += len(data)  # a Changes of many files is megabytes

    def _error(self, message: str, status: int = 200,
               headers: Optional[Dict[str, str]] = None) -> None:
        self._json({"Err": message}, status, headers)

    def send_error(self, code: int, message: Optional[str] = None,
                   explain: Optional[str] = None) -> None:
        """The standard library's own refusals (a malformed request line or headers, a
        line too long): answered as every error here is, {"Err": ...}, which dockerd's
        plugin client shows, and the connection closed (what follows cannot be read)."""
        text = message or self.responses.get(code, ("refused",))[0]
        self.log_error("code %d, message %s", code, text)
        self.close_connection = True
        if not _at_least_http_1_0(getattr(self, "request_version", "")):
            # A garbled request line reads as HTTP/0.9, which has no status line (nor
            # does a version below 1.0): answer as HTTP/1.0 so that the client sees the
            # status and the reason.
            self.request_version = "HTTP/1.0"
        self._error(text, code, {"Allow": "POST"} if code == 405 else None)

    def parse_request(self) -> bool:
        # http.server answers HTTP/0.9 in its own way, a body with no status line and no
        # headers: both for a simple request (no version on the line) and for a full
        # request line that names a version below 1.0. Plugin calls are HTTP/1.x: refuse
        # both with a 505 and a status line (send_error answers as HTTP/1.0), before the
        # headers of a simple request are waited for.
        line = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        if len(line.split()) == 2:
            # what http.server's parse_request sets first (log_request reads them)
            self.command, self.requestline = None, line  # type: ignore[assignment]
            self.request_version = "HTTP/1.0"
            self.send_error(505, "a request line with no HTTP version (an HTTP/0.9 "
                            "request): plugin calls are HTTP/1.0 or HTTP/1.1")
            return False
        if not super().parse_request():
            return False
        if not _at_least_http_1_0(self.request_version):
            self.send_error(505, f"HTTP version {self.request_version[:20]!r} is not "
                            "supported: plugin calls are HTTP/1.0 or HTTP/1.1")
            return False
        if self.command != "POST":
            self.send_error(405, f"{self.command[:20]!r} is not a plugin call: calls are "
                            "POST /<Plugin.Method> with a JSON body")
            return False
        return True

    # ---------------------------------------------------------------- dispatch

    def do_POST(self) -> None:  # noqa: N802 (http.server naming)
        try:
            url = urlsplit(self.path)
        except ValueError as e:  # "//[x": Pythons without the gh-87389 fix keep the "//"
            self.send_error(400, f"request target {self.path[:80]!r} is not a path: {e}")
            return
        method = url.path.lstrip("/")
        try:
            body = self._body_reader(method)
        except RequestError as e:
            self.close_connection = True  # the body's end is not known: nothing after it is
            log.warning("%s refused (%d): %s", method, e.status, e)
            self._error(f"{method}: {e}", e.status)
            return
        req = Request(method, url.query, body)
        try:
            self._dispatch(method, req)
        finally:
            self._moved += body.received

    def _dispatch(self, method: str, req: Request) -> None:
        route = self.server.routes.get(method)
        if route is None:
            self._finish_body(req)
            hint = (" (this daemon serves no volumes: `volumes = true` in its "
                    "configuration turns them on)"
                    if method in VOLUME_ROUTES else "")
            self._error(f"unknown plugin call {method}{hint}", 404)
            return
        try:
            result = route(req)
            req.body.drain()
        except Exception as e:  # every failure is answered
            self._failed(method, req, e)
            return
        if callable(result):
            self._stream(method, result)
        else:
            self._json(result)

    def _failed(self, method: str, req: Request, e: Exception) -> None:
        """Answer a call that failed: a broken request with its 4xx status (a broken body
        is the problem, whatever the call made of it: its message, from the call, names the
        layer), a driver error as dockerd expects errors, anything else as a 500."""
        broken = req.body.error or (e if isinstance(e, RequestError) else None)
        if broken is not None:
            status = broken.status
            # The call's own message, which names the layer, when it made one of it.
            message = str(e) if isinstance(e, DriverError) and e is not req.body.error \
                else f"{method}: {broken}"
            log.warning("%s refused (%d): %s", method, status, message)
        elif isinstance(e, DriverError):
            status, message = 200, str(e)
            log.warning("%s failed: %s", method, message)
        else:
            status = 500
            message = (f"{method}: internal error in the cvmfs graph driver: {e!r} "
                       "(details in the driver's log)")
            log.error("%s failed unexpectedly:\n%s", method, traceback.format_exc())
        self._finish_body(req)
        self._error(message, status)

    def _finish_body(self, req: Request) -> None:
        """Read the rest of a failed call's body: a client still sending it (ApplyDiff)
        would otherwise get a broken pipe instead of our answer. A body that cannot be
        read to its end leaves the connection unusable: it is closed after the answer."""
        try:
            req.body.drain()
        except Exception:
            self.close_connection = True  # the rest of the body is unread

    def _body_reader(self, method: str) -> _Body:
        """The request's body as its headers frame it, checked before a byte of it is
        read: plain (Content-Length) or chunked, nothing else, and no larger than the
        call takes. RequestError names what is wrong."""
        streamed = method in STREAMED_BODIES
        limit = None if streamed else MAX_JSON_BODY
        idle = STREAM_TIMEOUT if streamed else REQUEST_TIMEOUT
        encodings = self.headers.get_all("Transfer-Encoding") or []
        lengths = [v.strip() for v in self.headers.get_all("Content-Length") or []]
        if encodings:
            codings = [c.strip().lower() for v in encodings for c in v.split(",") if c.strip()]
            if not codings:
                raise RequestError("empty Transfer-Encoding header")
            if codings != ["chunked"]:
                raise RequestError(f"Transfer-Encoding {', '.join(codings)[:80]!r} is not "
                                   "supported: a body is sent chunked or with a "
                                   "Content-Length", 501)
            if lengths:
                # RFC 9112 6.3: a request smuggling attempt, or a broken client.
                raise RequestError("both Transfer-Encoding and Content-Length: a body is "
                                   "framed by one of them")
            self.connection.settimeout(idle)
            return ChunkedReader(self.rfile, limit, idle)  # type: ignore[arg-type]
        if len(set(lengths)) > 1:
            raise RequestError(f"conflicting Content-Length headers: "
                               f"{', '.join(lengths)[:80]!r}")
        raw = lengths[0] if lengths else "0"
        if not _DECIMAL.fullmatch(raw) or int(raw) > MAX_BODY_LENGTH:
            raise RequestError(f"Content-Length {raw[:40]!r} is not a byte count (decimal "
                               f"digits, at most {MAX_BODY_LENGTH})")
        length = int(raw)
        if limit is not None and length > limit:
            raise RequestError(f"a request body of {length} bytes is larger than {limit}, "
                               "the most a call's JSON may be", 413)
        self.connection.settimeout(idle)
        return LengthReader(self.rfile, length, idle)  # type: ignore[arg-type]

    def _stream(self, method: str, write: DiffWriter) -> None:
        """A streamed answer (Diff): chunked, so a failure can only truncate it."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.connection.settimeout(STREAM_TIMEOUT)
        out = ChunkedWriter(self.wfile)  # type: ignore[arg-type]
        try:
            write(out)  # type: ignore[arg-type]
        except (socket.timeout, BrokenPipeError, ConnectionResetError) as e:
            what = (f"took nothing for {STREAM_TIMEOUT} s" if isinstance(e, socket.timeout)
                    else f"went away ({e})")
            log.warning("%s: the client %s: answer abandoned mid-stream", method, what)
            self.close_connection = True
            return
        except Exception:
            log.error("%s failed mid-stream:\n%s", method, traceback.format_exc())
            self.close_connection = True  # the client sees a truncated tar, not a valid one
            return
        finally:
            self._moved += out.sent
        out.close()


class PluginServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """One thread per connection, at most `max_connections` at once (MAX_CONNECTIONS)."""

    daemon_threads = True
    allow_reuse_address = False

    def __init__(self, sock: socket.socket, driver: Optional[Driver],
                 volumes: Optional[Volumes] = None,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        """Serves the GraphDriver calls when given a driver, the VolumeDriver calls when
        given volumes (the `volumes` command: volumes only)."""
        super().__init__("", Handler, bind_and_activate=False)
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._limit_logged = -float(LIMIT_LOG_INTERVAL)  # when the limit was last logged
        self._stopping = threading.Event()
        self.socket.close()
        self.socket = sock
        self.server_address = sock.getsockname()
        self.driver = driver
        self.volumes = volumes
        self.faces = implements(driver is not None, volumes)
        self.routes: Dict[str, Callable[[Request], Result]] = {
            "Plugin.Activate": lambda r: {"Implements": list(self.faces)}}
        if driver is not None:
            self.routes.update({m: functools.partial(route, driver)
                                for m, route in ROUTES.items()})
        if volumes is not None:
            self.routes.update({m: functools.partial(route, volumes)
                                for m, route in VOLUME_ROUTES.items()})

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve a new connection in its own thread; at the limit, first wait (accepting
        no other meanwhile: they queue in the listen backlog) until a connection closes."""
        if not self._slots.acquire(blocking=False):
            now = time.monotonic()
            if now - self._limit_logged >= LIMIT_LOG_INTERVAL:
                self._limit_logged = now
                log.warning("%d connections are open, the most this daemon serves at once: "
                            "new ones wait until one closes (an idle one is closed after "
                            "%g s)", self.max_connections, REQUEST_TIMEOUT)
            while not self._slots.acquire(timeout=0.5):
                if self._stopping.is_set():
                    self.shutdown_request(request)
                    return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def shutdown(self) -> None:
        self._stopping.set()  # a process_request waiting for a slot gives up
        super().shutdown()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that failed outside a call's own handling (the stdlib's default
        prints to stderr): one line for a client gone away, the traceback otherwise. The
        server serves on either way."""
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            log.info("connection ended: %s", error)
        else:
            log.error("connection failed unexpectedly:\n%s", traceback.format_exc())
