"""What ``cano-mp serve`` opens beside its scheduler: a control socket and a metrics page.

Control socket (``serve --control [PATH]``): a Unix stream socket, mode 0600, that speaks
JSON lines both ways::

    -> {"op": "list"}                      <- {"ok": true, "flows": [FlowInfo.to_json(), ...]}
    -> {"op": "trigger", "flow": "report"}  <- {"ok": true}
    -> {"op": "pause" | "resume" | "reset", "flow": ...}
    -> {"op": "stop"}                      <- {"ok": true}   (serve then stops as on SIGTERM)
    <- {"ok": false, "error": "no flow with id 'x' (known: ...)"}

A path the user gives is used as given (its directory's mode is theirs); without one the
socket lives in a fresh 0700 directory made with ``mkdir`` (never adopted) under
``$XDG_RUNTIME_DIR`` or the temp directory. Every peer's uid is checked with ``SO_PEERCRED``:
another uid gets one refusal line and is disconnected. Requests are bounded (one line of at
most 64 KiB, 30 s idle per connection, 16 connections at once).

Metrics (``serve --metrics-port N``): the served workflows' :class:`MetricsObserver` as
Prometheus text at ``http://127.0.0.1:N/metrics``, from ``http.server`` in a daemon thread.
Not ``prometheus_client``: one read-only endpoint of text we already render is not worth a
dependency (nor its global registry).
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import stat
import struct
import tempfile
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .._errors import CanoError, ConfigError, StoreError
from .._log import get_logger
from .._metrics import MetricsObserver
from .._store.shm import check_private_dir

if TYPE_CHECKING:
    from .scheduler import Scheduler

__all__ = [
    "ControlError",
    "ControlServer",
    "MetricsServer",
    "attach_metrics",
    "default_control_path",
    "request",
]

log = get_logger("cano_mp.control")

MAX_LINE = 64 * 1024
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 16
FLOW_OPS = ("trigger", "pause", "resume", "reset")
OPS = ("list", "stop", *FLOW_OPS)
SOCKET_NAME = "control.sock"


class ControlError(CanoError):
    """The control socket could not be reached, or refused the request."""


def default_control_path() -> str:
    """A socket path in a new private directory (0700, made here, never adopted)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    root = runtime if runtime and os.path.isdir(runtime) else tempfile.gettempdir()
    directory = tempfile.mkdtemp(prefix=f"cano_mp-ctl-{os.getpid()}-", dir=root)  # mkdir 0700
    try:
        check_private_dir(directory)
    except StoreError as exc:
        raise ConfigError(f"--control: {exc}") from None
    return os.path.join(directory, SOCKET_NAME)


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message, separators=(",", ":")).encode() + b"\n")


class _Handler(socketserver.StreamRequestHandler):
    server: _Server
    timeout = IDLE_TIMEOUT

    def handle(self) -> None:
        try:
            self.serve_lines()
        except OSError:  # idle past IDLE_TIMEOUT, or the peer went away
            pass

    def serve_lines(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            if len(line) > MAX_LINE:
                _send(self.request, {"ok": False, "error": "request line too long"})
                return
            reply, then = self.server.control.answer(line)
            _send(self.request, reply)
            if then is not None:
                then()


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True
    block_on_close = False
    control: ControlServer

    def verify_request(self, request: Any, client_address: Any) -> bool:
        uid = _peer_uid(request)
        if uid != os.geteuid():
            log.warning("control socket: refused a connection from uid %d", uid)
            try:
                _send(request, {"ok": False, "error": f"refused: uid {uid} is not the server's"})
            except OSError:
                pass
            return False
        if not self.control.slots.acquire(blocking=False):
            _send(request, {"ok": False, "error": "too many control connections"})
            return False
        return True

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.control.slots.release()


class ControlServer:
    """The control socket of a served :class:`Scheduler` (see the module docstring);
    ``on_stop`` is called (after the reply) for ``stop``."""

    def __init__(self, sched: Scheduler, path: str | None, on_stop: Callable[[], None]):
        self.sched = sched
        self.on_stop = on_stop
        self.made_dir: str | None = None
        if path is None:
            path = default_control_path()
            self.made_dir = os.path.dirname(path)
        self.path = path
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._clear_stale(path)
        # The socket file is born 0600 (bind() has no mode argument). umask is per process:
        # serve opens this before the scheduler starts, when no other thread makes files.
        old = os.umask(0o177)
        try:
            self.server = _Server(path, _Handler)
        except OSError as exc:
            raise ConfigError(f"--control: cannot listen on {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or stat.S_IMODE(st.st_mode) != 0o600:
            self.server.server_close()
            raise ConfigError(f"--control: {path} was replaced while it was being made")
        self.server.control = self
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
            name="cano_mp-control", daemon=True,
        )  # fmt: skip
        self.thread.start()
        log.info("control socket at %s", path)

    @staticmethod
    def _clear_stale(path: str) -> None:
        """Remove a socket left by a dead server of ours; refuse anything else."""
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.geteuid():
            raise ConfigError(f"--control: {path} exists and is not a socket of ours")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # nobody listens: a leftover
            return
        finally:
            probe.close()
        raise ConfigError(f"--control: another server listens on {path}")

    def answer(self, line: bytes) -> tuple[dict[str, Any], Callable[[], None] | None]:
        """The reply to one request line, and what to do once it is sent."""
        try:
            msg = json.loads(line)
        except ValueError:
            return {"ok": False, "error": "not a JSON line"}, None
        op = msg.get("op") if isinstance(msg, dict) else None
        if op not in OPS:
            return {"ok": False, "error": f"unknown op {op!r} (known: {', '.join(OPS)})"}, None
        if op == "list":
            return {"ok": True, "flows": [i.to_json() for i in self.sched.list()]}, None
        if op == "stop":
            log.info("stop requested on the control socket")
            return {"ok": True}, self.on_stop
        flow = msg.get("flow")
        if not isinstance(flow, str):
            return {"ok": False, "error": f"{op} needs a flow id"}, None
        try:
            getattr(self.sched, op)(flow)
        except CanoError as exc:
            return {"ok": False, "error": str(exc)}, None
        except Exception as exc:  # a bug: the client still gets an answer
            log.exception("control socket: %s %r failed", op, flow)
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}, None
        log.info("control socket: %s %r", op, flow)
        return {"ok": True}, None

    def close(self) -> None:
        """Stop serving, close the socket and remove its file (and the default directory)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)
        for remove, target in ((os.unlink, self.path), (os.rmdir, self.made_dir)):
            if target is not None:
                try:
                    remove(target)
                except OSError:
                    pass


def request(path: str, message: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to a control socket and return its reply."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            raise ControlError(f"cannot connect to {path}: {exc.strerror or exc}") from None
        try:
            _send(sock, message)
            with sock.makefile("rb") as f:
                line = f.readline(MAX_LINE + 1)
        except OSError as exc:
            raise ControlError(f"{path}: connection lost: {exc.strerror or exc}") from None
    finally:
        sock.close()
    if not line:
        raise ControlError(f"{path} closed the connection without a reply (refused?)")
    try:
        reply = json.loads(line)
    except ValueError:
        raise ControlError(f"{path} did not answer a JSON line") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path} did not answer a JSON object")
    return reply


def attach_metrics(sched: Scheduler) -> MetricsObserver:
    """A MetricsObserver notified by every workflow the scheduler runs (instances of
    concurrent flows included: they run the flow's workflow)."""
    observer = MetricsObserver()
    for flow in sched._flows.values():
        flow.spec.workflow._observe(observer)
    return observer


class MetricsServer:
    """``GET /metrics`` on 127.0.0.1: the observer's Prometheus text."""

    def __init__(self, observer: MetricsObserver, port: int) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = observer.to_prometheus().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("metrics: " + format, *args)

        try:
            self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        except OSError as exc:
            raise ConfigError(f"--metrics-port {port}: {exc.strerror}") from None
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
            name="cano_mp-metrics", daemon=True,
        )  # fmt: skip
        self.thread.start()
        log.info("metrics at http://127.0.0.1:%d/metrics", self.port)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)
