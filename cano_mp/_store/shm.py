"""Shared-memory segments: files on tmpfs that no other user can reach and that never outlive
their owner.

Layout::

    /dev/shm/cano_mp-<pid>-<random>/        one directory per process (0700, made by mkdir)
        .owner.lock                         flock-ed by the owner for its whole life
        .groups                             process groups of its pool workers (one per line)
        pool<id>-flags                      a pool's cancel/progress flags (0600)
        s<store>/                           one per SharedStore (0700)
            d<n>                            a segment written by the driver (0600)
            <token>-<n>                     a segment written by a task attempt in a worker

The same layout lives under the temp directory, for segments that do not fit in tmpfs.

Who can get in: nobody but our uid. A process directory's name has 64 random bits (the pid
is there for humans only), it is made with ``mkdir`` and never adopted if it exists, and it
is checked with ``lstat`` (a real directory, ours, 0700) before use. Its root must be ours
or sticky (``/dev/shm`` and ``/tmp`` are), so nobody else can rename or replace it. Files
are created with ``O_CREAT|O_EXCL|O_NOFOLLOW``; a reader opens with ``O_NOFOLLOW`` and checks
with ``fstat`` that the file is a regular file of its own uid, not writable by others and as
long as it should be, before it maps or unpickles anything.

When memory is freed: the driver owns every segment through a :class:`Segment`; reference
counting unlinks the file when no store key and no live snapshot refers to it. A mapping is
never unmapped under a live array: an array handed out by the store keeps its ``mmap``
object alive, and the kernel keeps an unlinked file's pages until the last mapping goes.

What a crash leaves: ``SharedStore.close()`` removes its directory, an ``atexit`` hook (and
cano_mp's SIGTERM handler) the process directory. After a SIGKILL, ``janitor.run_janitor`` —
run once by every cano_mp process that touches shared memory — removes a directory only if
it can take the owner's ``flock`` (the kernel drops it when the owner dies, whatever PID
namespace it ran in), only if it is owned by our uid, never following symlinks; it first
kills what is left of the dead owner's worker process groups (the children tasks started).

Space is reserved when a segment is created: ``pwrite`` or ``posix_fallocate`` fails with
``ENOSPC`` where a write through a mapping of a sparse file would be a SIGBUS. A full tmpfs
falls back to the temp directory with a logged warning; a full disk is a ``StoreError``.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import mmap
import os
import secrets
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable
from typing import TypeVar

from .._errors import StoreError
from .._log import get_logger

__all__ = [
    "PREFIX",
    "Segment",
    "check_private_dir",
    "create_writable",
    "map_readonly",
    "open_checked",
    "open_private",
    "own_dirs",
    "process_dir",
    "process_dirs",
    "read_segment_bytes",
    "record_process_group",
    "segment_dirs",
    "write_segment",
]

log = get_logger("cano_mp.store")

PREFIX = "cano_mp-"
SHM_ROOT = "/dev/shm"
LOCK_NAME = ".owner.lock"
GROUPS_NAME = ".groups"
# Every process a pool worker starts inherits this variable: the janitor kills a dead
# owner's leftover process groups only where their members carry the owner's directory name.
OWNER_ENV = "CANO_MP_OWNER"
# Keep this much free on tmpfs after a write: a cheap early fallback before ENOSPC.
SHM_FREE_MARGIN = 64 * 1024 * 1024

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)

_lock = threading.RLock()  # re-entered by the SIGTERM handler (main thread)
_created: dict[str, str] = {}  # root -> this process's directory under it
_lock_fds: dict[str, int] = {}  # directory -> fd holding its owner lock
_owner_pid: int | None = None
_warned_fallback = False

T = TypeVar("T")


# -- private directories -------------------------------------------------------------------
def check_private_dir(path: str) -> None:
    """Raise :class:`StoreError` unless ``path`` is a real directory of ours, mode 0700."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise StoreError(f"shared-memory directory {path} is gone (store closed?)") from None
    problem = None
    if not stat.S_ISDIR(st.st_mode):
        problem = "is not a directory (a symlink or file was put in its place)"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by us ({os.geteuid()})"
    elif stat.S_IMODE(st.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    if problem is not None:
        raise StoreError(f"refusing to use {path}: it {problem}")


def _root_is_safe(root: str) -> bool:
    """A root where nobody else can rename or replace what we make: ours, or sticky."""
    try:
        st = os.stat(root)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode) or not os.access(root, os.W_OK | os.X_OK):
        return False
    others_write = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if others_write and not st.st_mode & stat.S_ISVTX and st.st_uid != os.geteuid():
        log.warning(
            "not using %s for shared memory: others can write to it and it is not sticky", root
        )
        return False
    return True


def _roots() -> list[str]:
    roots = []
    if os.path.isdir(SHM_ROOT) and _root_is_safe(SHM_ROOT):
        roots.append(SHM_ROOT)
    roots.append(tempfile.gettempdir())
    return roots


def _make_process_dir(root: str) -> str:
    if not _root_is_safe(root):
        raise StoreError(f"cannot use {root} for the store: not a directory we can use safely")
    for _ in range(16):
        path = os.path.join(root, f"{PREFIX}{os.getpid()}-{secrets.token_hex(8)}")
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue  # never adopt: another name
        dfd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW)
        try:
            st = os.fstat(dfd)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
                raise StoreError(f"refusing to use {path}: not the directory we made")
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(dfd, 0o700)  # a umask stripped bits mkdir asked for
            lock_fd = os.open(
                LOCK_NAME, os.O_CREAT | os.O_EXCL | os.O_RDWR | _O_NOFOLLOW, 0o600, dir_fd=dfd
            )
        finally:
            os.close(dfd)
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        _lock_fds[path] = lock_fd
        check_private_dir(path)
        return path
    raise StoreError(f"could not make a private directory under {root}")  # pragma: no cover


def process_dir(root: str) -> str:
    """This process's private directory under ``root`` (made on first use)."""
    global _owner_pid
    with _lock:
        if _owner_pid != os.getpid():  # first use, or a forked child: its own directories
            _created.clear()
            _lock_fds.clear()
            _owner_pid = os.getpid()
        path = _created.get(root)
        if path is None or not os.path.isdir(path):
            if not _created:
                atexit.register(remove_process_dirs)
                _install_sigterm_cleanup()
            path = _make_process_dir(root)
            _created[root] = path
        return path


def _install_sigterm_cleanup() -> None:
    try:
        from .. import _signals

        _signals.install()
    except Exception:  # pragma: no cover - never fail a store over a signal handler
        log.debug("could not install the SIGTERM handler", exc_info=True)


def segment_dirs(name: str) -> tuple[str | None, str]:
    """``(tmpfs dir or None, temp dir)`` named ``name`` inside this process's directories
    (0700). The one rule for "tmpfs if usable, else the temp dir". The first is made now;
    with tmpfs usable, the temp dir is made only when a segment falls back to it (a
    directory on disk costs a journaled ``mkdir``, most of a small store's creation)."""
    roots = _roots()
    shm = os.path.join(process_dir(SHM_ROOT), name) if SHM_ROOT in roots else None
    disk = os.path.join(process_dir(tempfile.gettempdir()), name)
    first = shm if shm is not None else disk
    os.mkdir(first, 0o700)
    check_private_dir(first)
    return (shm, disk)


def _fallback_dir(disk: str) -> None:
    """Make the temp dir of a store whose tmpfs dir lacks room (once, by whichever process
    of the owner's comes first; its parent is the owner's private directory)."""
    try:
        os.mkdir(disk, 0o700)
    except FileExistsError:
        pass
    check_private_dir(disk)


def process_dirs() -> list[str]:
    """This process's directories that exist now (for tests and diagnostics)."""
    with _lock:
        if _owner_pid != os.getpid():
            return []
        return [d for d in _created.values() if os.path.isdir(d)]


def own_dirs() -> set[str]:
    """This process's directories, existing or not (the janitor never touches them)."""
    with _lock:
        return set(_created.values()) if _owner_pid == os.getpid() else set()


def remove_process_dirs() -> None:
    """Remove this process's directories now (at exit, or on SIGTERM)."""
    with _lock:
        if _owner_pid != os.getpid():
            return  # a forked child inherited the hook: the directories are not its own
        paths = list(_created.values())
        _created.clear()
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        fd = _lock_fds.pop(path, None)
        if fd is not None:
            os.close(fd)


def record_process_group(pgid: int) -> None:
    """Note a worker's process group, killed by a janitor if this process dies by SIGKILL."""
    path = os.path.join(
        process_dir(SHM_ROOT if SHM_ROOT in _roots() else tempfile.gettempdir()), GROUPS_NAME
    )
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_APPEND | _O_NOFOLLOW, 0o600)
    try:
        os.write(fd, f"{pgid}\n".encode())
    finally:
        os.close(fd)


def owner_name() -> str:
    """The name of this process's first private directory (its ``OWNER_ENV`` value)."""
    return os.path.basename(process_dir(_main_root()))


def _main_root() -> str:
    return SHM_ROOT if SHM_ROOT in _roots() else tempfile.gettempdir()


# -- segment files -------------------------------------------------------------------------
def open_private(path: str, flags: int = os.O_RDONLY, size: int | None = None) -> int:
    """Open an existing file of ours without following links; check it before use.

    Refuses (``StoreError``) a file that is not a regular file, not owned by our uid, writable
    by others, or shorter than ``size`` (mapping past its end would be a SIGBUS).
    """
    return open_checked(path, size, flags)[0]


def open_checked(
    path: str, size: int | None = None, flags: int = os.O_RDONLY
) -> tuple[int, os.stat_result]:
    """:func:`open_private`, also returning the ``fstat`` it checked (a file's identity)."""
    try:
        fd = os.open(path, flags | _O_NOFOLLOW)
    except FileNotFoundError:
        raise StoreError(f"shared-memory segment {path} is gone (store closed?)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreError(f"refusing to open {path}: it is a symlink") from None
        raise
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "it is not a regular file"
    elif st.st_uid != os.geteuid():
        problem = f"it is owned by uid {st.st_uid}, not by us"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = "others can write to it"
    elif size is not None and st.st_size < size:
        problem = f"it holds {st.st_size} bytes, not {size}"
    if problem is not None:
        os.close(fd)
        raise StoreError(f"refusing to read shared-memory segment {path}: {problem}")
    return fd, st


def _create(path: str) -> int:
    return os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | _O_NOFOLLOW, 0o600)


def _place(dirs: tuple[str | None, str], name: str, nbytes: int, make: Callable[[str], T]) -> T:
    """Run ``make(path)`` in tmpfs when it has room, else (or on ENOSPC) in the temp dir."""
    global _warned_fallback
    shm, disk = dirs
    if shm is not None and not os.path.isdir(shm):
        raise _closed_store(shm)  # not "lacks room": statvfs of a removed directory fails
    if shm is not None and _has_room(shm, nbytes):
        try:
            return make(os.path.join(shm, name))
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise _closed_store(shm) from exc
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            reason = "is full"
        except StoreError:
            raise
    else:
        reason = "lacks room"
    if shm is not None and not _warned_fallback:
        _warned_fallback = True
        log.warning(
            "shared memory (%s) %s for %d bytes: using %s instead (slower); "
            "give the container a larger /dev/shm (docker run --shm-size=...)",
            SHM_ROOT,
            reason,
            nbytes,
            os.path.dirname(os.path.dirname(disk)),
        )
    try:
        if shm is not None:
            _fallback_dir(disk)
        return make(os.path.join(disk, name))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _closed_store(disk) from exc
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise StoreError(
                f"no space left for a {nbytes}-byte segment in shared memory or in "
                f"{os.path.dirname(os.path.dirname(disk))}: free some, or store less"
            ) from exc
        raise


def _closed_store(directory: str) -> StoreError:
    return StoreError(
        f"the store was closed while this task ran: its directory {directory} is gone, so "
        "the task's writes have nowhere to go (close a store only after its runs ended)"
    )


def _has_room(path: str, nbytes: int) -> bool:
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize >= nbytes + SHM_FREE_MARGIN


def write_segment(dirs: tuple[str | None, str], name: str, data: memoryview) -> str:
    """Create segment ``name`` (0600, must not exist) holding ``data``; return its path."""
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data

    def make(path: str) -> str:
        fd = _create(path)
        try:
            total = view.nbytes
            written = 0
            while written < total:
                written += os.pwrite(fd, view[written:], written)
        except BaseException:
            os.close(fd)
            _unlink(path)
            raise
        os.close(fd)
        return path

    return _place(dirs, name, view.nbytes, make)


def create_writable(dirs: tuple[str | None, str], name: str, nbytes: int) -> tuple[str, mmap.mmap]:
    """Create segment ``name`` of ``nbytes`` zero bytes, space reserved, mapped writable."""

    def make(path: str) -> tuple[str, mmap.mmap]:
        fd = _create(path)
        try:
            size = max(nbytes, 1)
            os.posix_fallocate(fd, 0, size)  # ENOSPC now, not SIGBUS on first touch
            return path, mmap.mmap(fd, size, access=mmap.ACCESS_WRITE)
        except BaseException:
            _unlink(path)
            raise
        finally:
            os.close(fd)

    return _place(dirs, name, nbytes, make)


def map_readonly(path: str, nbytes: int) -> mmap.mmap:
    """Map an existing segment of ours read-only (checked first: see :func:`open_private`)."""
    fd = open_private(path, size=nbytes)
    try:
        return mmap.mmap(fd, max(nbytes, 1), access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def read_segment_bytes(path: str, nbytes: int) -> bytes:
    """A checked segment's first ``nbytes`` bytes, read into memory."""
    fd = open_private(path, size=nbytes)
    try:
        chunks = []
        done = 0
        while done < nbytes:
            chunk = os.pread(fd, nbytes - done, done)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Segment:
    """The driver's handle on one segment file: unlinked when the last reference goes.

    Releasing never unmaps: an ``mmap`` lives as long as an array (or a view) uses it, and
    the kernel keeps an unlinked file's pages until then. Unmapping under a live numpy
    array would be a segfault at its next access.
    """

    __slots__ = ("__weakref__", "_mm", "nbytes", "path")

    def __init__(self, path: str, nbytes: int, mm: mmap.mmap | None = None) -> None:
        self.path = path
        self.nbytes = nbytes
        self._mm = mm

    def view(self) -> memoryview:
        """A read-only view of the segment's bytes (mapped on first use)."""
        if self._mm is None:
            self._mm = map_readonly(self.path, self.nbytes)
        return memoryview(self._mm)[: self.nbytes].toreadonly()

    def release(self) -> None:
        self._mm = None
        _unlink(self.path)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def __repr__(self) -> str:
        return f"<Segment {self.path} {self.nbytes} bytes>"
