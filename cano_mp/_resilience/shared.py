"""Shared cells: a few numbers that every process of a pool reads and writes under one lock.

::

    driver                                 worker processes (pool)
      CircuitBreaker(name="api") ---pickled: kind, name, parameters---> same object
            \\                                   /
             +--> <driver's process dir>/resil/b-<hash of name>   (0600, in a 0700 dir)
                  one small file, mapped shared; fcntl.flock + a thread lock around each use

Where the file lives: in the private directory of the *driver* (the process that owns the
pool). A worker finds it through the ``CANO_MP_OWNER`` variable its pool sets, so an object
built in a worker (at import time, say) with the same ``name`` opens the same file; the file
name is a hash of the kind and the name, so nothing a user names reaches the file system.
The directory goes away with the driver (atexit, SIGTERM, or the next process's janitor
after a SIGKILL), as the store's segments do.

Why ``flock``: the kernel drops it when its holder dies, SIGKILL included, so a worker
killed inside a critical section never deadlocks the others. The lock is per open file, so
threads of one process that share a cell also take a ``threading.Lock``. A critical section
is a few ``struct`` reads and one write: a holder killed in the middle leaves at worst a
stale number, never a lock.

Layout of a cell: ``magic`` (0 until the first user initialises it, under the lock), the
parameters it was made with (a second object of the same name must agree), then the state
fields of its kind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
import secrets
import stat
import struct
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

from .._errors import ConfigError, StoreError
from .._store import shm as _shm

__all__ = ["STATE_AT", "SharedCell", "lock_all", "unlock_all"]

_MAGIC = 0x43414E4F52534C31  # "CANORSL1"
_HEAD = struct.Struct("<Q")
_PARAMS = struct.Struct("<8d")
STATE_AT = _HEAD.size + _PARAMS.size
CELL_BYTES = 4096
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)

_dir_lock = threading.Lock()  # opening cells
_mkdir_lock = threading.Lock()
_dirs: dict[int, str] = {}  # pid -> the shared directory, once made or found


def _owner_dir() -> str:
    """The driver's private directory: ours, unless a pool started this process."""
    owner = os.environ.get(_shm.OWNER_ENV)
    if not owner:
        owner = _shm.owner_name()
    for root in (_shm.SHM_ROOT, tempfile.gettempdir()):
        path = os.path.join(root, owner)
        if os.path.isdir(path):
            _shm.check_private_dir(path)
            return path
    raise StoreError(
        f"the shared-memory directory {owner} of the process that owns this pool is gone: "
        "circuit breakers and rate limiters cannot be shared without it"
    )


def shared_dir() -> str:
    """This process's view of the directory that holds every shared cell (made once)."""
    pid = os.getpid()
    path = _dirs.get(pid)
    if path is not None:
        return path
    with _mkdir_lock:
        path = os.path.join(_owner_dir(), "resil")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # made by the driver or another worker: checked below, never trusted
        _shm.check_private_dir(path)
        _dirs[pid] = path
        return path


def _open_cell(path: str) -> int:
    """Open the cell at ``path``, making it if it is not there. A new cell is made whole
    under a name of its own, then linked into place: another process never sees it shorter
    than :data:`CELL_BYTES` (it would refuse it), however its maker is scheduled."""
    if os.path.lexists(path):
        return _shm.open_private(path, os.O_RDWR, size=CELL_BYTES)
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.new"
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_RDWR | _O_NOFOLLOW, 0o600)
    try:
        os.posix_fallocate(fd, 0, CELL_BYTES)  # zeros: magic 0 means "not initialised yet"
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:  # another process linked its cell first: use that one
        os.close(fd)
        return _shm.open_private(path, os.O_RDWR, size=CELL_BYTES)
    except BaseException:
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return fd


class SharedCell:
    """A cell of ``fields`` (a ``struct`` format) shared by name across a pool's processes.

    Open lazily in each process (after unpickling, or in a forked child, a fresh file
    description: an inherited one would share the parent's ``flock``). Use
    :meth:`lock` / :meth:`unlock` around :meth:`read` / :meth:`write`.
    """

    __slots__ = ("_fd", "_mm", "_pid", "_tlock", "fields", "initial", "kind", "name", "params")

    def __init__(
        self,
        kind: str,
        name: str,
        params: Sequence[float],
        fields: str,
        initial: Sequence[float],
    ) -> None:
        self.kind = kind
        self.name = name
        self.params = tuple(float(p) for p in params) + (0.0,) * (8 - len(params))
        self.fields = struct.Struct("<" + fields)
        if STATE_AT + self.fields.size > CELL_BYTES:  # pragma: no cover - a programming error
            raise ValueError("cell too large")
        self.initial = tuple(initial)
        self._pid = -1
        self._fd = -1
        self._mm: Any = None
        self._tlock = threading.Lock()

    @property
    def path(self) -> str:
        digest = hashlib.sha256(f"{self.kind}\0{self.name}".encode()).hexdigest()[:32]
        return os.path.join(shared_dir(), f"{self.kind}-{digest}")

    def _open(self) -> None:
        fd = _open_cell(self.path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size < CELL_BYTES:  # pragma: no cover
                raise StoreError(f"refusing to use shared cell {self.path}: not ours")
            mm = mmap.mmap(fd, CELL_BYTES, access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._fd, self._mm, self._pid = fd, mm, os.getpid()
        self.lock()  # _pid is set: no reopening
        try:
            self._initialise()
        finally:
            self.unlock()

    def _initialise(self) -> None:
        mm = self._mm
        (magic,) = _HEAD.unpack_from(mm, 0)
        if magic == 0:
            _PARAMS.pack_into(mm, _HEAD.size, *self.params)
            self.fields.pack_into(mm, STATE_AT, *self.initial)
            _HEAD.pack_into(mm, 0, _MAGIC)
            return
        theirs = _PARAMS.unpack_from(mm, _HEAD.size)
        if theirs != self.params:
            raise ConfigError(
                f"a {self.kind} named {self.name!r} already exists in this pool with other "
                f"settings ({_describe(theirs)} vs {_describe(self.params)}): give each "
                "configuration its own name"
            )

    def lock(self) -> None:
        """Take the thread lock, then the file lock (opening the cell on first use)."""
        if self._pid != os.getpid():
            self._reopen()
        self._tlock.acquire()
        try:
            _flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._tlock.release()
            raise

    def unlock(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._tlock.release()

    def _reopen(self) -> None:
        with _dir_lock:
            if self._pid == os.getpid():
                return
            # First use here, or a forked child: an inherited descriptor shares the parent's
            # flock (dropped without unlocking, which would unlock the parent's), and an
            # inherited thread lock may be held by a thread that does not exist here.
            self._tlock = threading.Lock()
            self._fd, self._mm = -1, None
            self._open()

    def read(self) -> tuple[Any, ...]:
        return self.fields.unpack_from(self._mm, STATE_AT)

    def write(self, values: Sequence[Any]) -> None:
        self.fields.pack_into(self._mm, STATE_AT, *values)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.kind, self.name, self.params, self.fields.format, self.initial)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.kind, self.name, self.params, fmt, self.initial = state
        self.fields = struct.Struct(fmt)
        self._pid, self._fd, self._mm = -1, -1, None
        self._tlock = threading.Lock()

    def __del__(self) -> None:
        if self._pid == os.getpid() and self._fd >= 0:
            try:
                os.close(self._fd)
            except OSError:
                pass


def _flock(fd: int, op: int) -> None:
    while True:
        try:
            fcntl.flock(fd, op)
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        except OSError as exc:  # pragma: no cover
            if exc.errno != errno.EINTR:
                raise


def _describe(params: Sequence[float]) -> str:
    return ", ".join(f"{p:g}" for p in params if p)


def lock_all(cells: Sequence[SharedCell]) -> list[SharedCell]:
    """Lock ``cells`` in one global order (by kind and name) so that two processes taking
    the same tiers never deadlock; return them in that order for :func:`unlock_all`."""
    # Two objects of one name share one file: locking one of them is enough.
    ordered = sorted({(c.kind, c.name): c for c in cells}.values(), key=lambda c: (c.kind, c.name))
    taken: list[SharedCell] = []
    try:
        for cell in ordered:
            cell.lock()
            taken.append(cell)
    except BaseException:
        unlock_all(taken)
        raise
    return ordered


def unlock_all(cells: Sequence[SharedCell]) -> None:
    for cell in reversed(cells):
        cell.unlock()
