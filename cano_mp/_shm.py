"""Shared-memory segments: files on tmpfs that never outlive their owner.

Layout::

    /dev/shm/cano_mp-<pid>-<start>/         one directory per driver process (0700)
        s<store>/                           one per SharedStore
            d<n>                            a segment written by the driver (0600)
            <token>-<n>                     a segment written by a task attempt in a worker

A segment holds one large buffer (an out-of-band pickle-5 buffer, e.g. a numpy array's
data, or a large pickle). The driver owns every segment through a :class:`Segment` object:
CPython's reference counting frees (unlinks) the file as soon as no store key and no live
snapshot refers to it. ``SharedStore.close()`` removes the store's directory, an ``atexit``
hook removes the process directory, and :func:`run_janitor` — run once by every cano_mp
process that touches shared memory — removes directories whose owner process is gone
(matched by pid *and* start time, so a reused pid is not mistaken for the owner).

When ``/dev/shm`` is missing or lacks room, segments go to the temp directory instead, with
a logged warning: on tmpfs, running out of space is a SIGBUS on first touch, not an
exception, so free space is checked (``os.statvfs``) before each segment is written.
"""

from __future__ import annotations

import atexit
import mmap
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator

from ._log import get_logger

__all__ = [
    "PREFIX",
    "Segment",
    "choose_dir",
    "map_readonly",
    "process_dirs",
    "run_janitor",
    "write_segment",
]

log = get_logger("cano_mp.store")

PREFIX = "cano_mp-"
SHM_ROOT = "/dev/shm"
# Keep this much free on tmpfs after a write: concurrent writers (the driver and several
# workers) check free space independently, so the margin absorbs their races.
SHM_FREE_MARGIN = 64 * 1024 * 1024

_lock = threading.Lock()
_created: dict[str, str] = {}  # root -> this process's directory under it
_owner_tag: str | None = None
_janitor_done = False
_warned_fallback = False


def _tag() -> str:
    global _owner_tag
    if _owner_tag is None:
        import psutil  # lazily: it costs ~15 ms of `import cano_mp`

        pid = os.getpid()
        start = int(psutil.Process(pid).create_time() * 100)
        _owner_tag = f"{PREFIX}{pid}-{start}"
    return _owner_tag


def _roots() -> list[str]:
    roots = []
    if os.path.isdir(SHM_ROOT) and os.access(SHM_ROOT, os.W_OK):
        roots.append(SHM_ROOT)
    roots.append(tempfile.gettempdir())
    return roots


def process_dirs() -> list[str]:
    """This process's directories that exist now (for tests and diagnostics)."""
    with _lock:
        return [d for d in _created.values() if os.path.isdir(d)]


def _process_dir(root: str) -> str:
    with _lock:
        path = _created.get(root)
        if path is None or not os.path.isdir(path):
            if not _created:
                atexit.register(_remove_process_dirs)
            path = os.path.join(root, _tag())
            os.makedirs(path, mode=0o700, exist_ok=True)
            os.chmod(path, 0o700)
            _created[root] = path
        return path


def _remove_process_dirs() -> None:
    if os.getpid() != _pid_of_tag():
        return  # a forked child inherited the hook: the directories are not its own
    for path in list(_created.values()):
        shutil.rmtree(path, ignore_errors=True)


def _pid_of_tag() -> int:
    return int(_tag()[len(PREFIX) :].split("-")[0])


def choose_dir(dirs: tuple[str | None, str], nbytes: int) -> str:
    """Pick ``dirs[0]`` (tmpfs) when it has room for ``nbytes``, else ``dirs[1]`` (disk).

    Both exist while their store is open (it creates them); a task still running after its
    store closed must not bring them back, so they are never created here.
    """
    global _warned_fallback
    shm, disk = dirs
    if shm is not None:
        try:
            st = os.statvfs(os.path.dirname(shm))
            if st.f_bavail * st.f_frsize >= nbytes + SHM_FREE_MARGIN:
                return shm
        except OSError:
            pass
        if not _warned_fallback:
            _warned_fallback = True
            log.warning(
                "shared memory (%s) lacks room for %d bytes: using %s instead (slower); "
                "give the container a larger /dev/shm (docker run --shm-size=...)",
                SHM_ROOT,
                nbytes,
                os.path.dirname(os.path.dirname(disk)),
            )
    return disk


def write_segment(path: str, data: memoryview) -> None:
    """Create ``path`` (0600, must not exist) holding ``data``."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
        total = view.nbytes
        if total:
            os.ftruncate(fd, total)
            written = 0
            while written < total:
                written += os.pwrite(fd, view[written:], written)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)


def create_writable(path: str, nbytes: int) -> mmap.mmap:
    """Create ``path`` of ``nbytes`` zero bytes and map it writable."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(nbytes, 1))
        return mmap.mmap(fd, max(nbytes, 1), access=mmap.ACCESS_WRITE)
    except BaseException:
        _unlink(path)
        raise
    finally:
        os.close(fd)


def map_readonly(path: str, nbytes: int) -> mmap.mmap:
    """Map an existing segment read-only."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return mmap.mmap(fd, max(nbytes, 1), access=mmap.ACCESS_READ)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Segment:
    """The driver's handle on one segment file: unlinked when the last reference goes."""

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
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass  # a user still holds an array on it: unmapped when that array dies
        _unlink(self.path)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:  # interpreter shutdown: modules may be gone
            pass

    def __repr__(self) -> str:
        return f"<Segment {self.path} {self.nbytes} bytes>"


def _candidates() -> Iterator[str]:
    for root in _roots():
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if name.startswith(PREFIX):
                yield os.path.join(root, name)


def _owner_alive(name: str) -> bool:
    import psutil

    try:
        pid_s, start_s = name[len(PREFIX) :].split("-", 1)
        pid, start = int(pid_s), int(start_s)
    except ValueError:
        return True  # not ours to judge
    try:
        created = int(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.Error:
        return True
    return abs(created - start) <= 1


def run_janitor(force: bool = False) -> list[str]:
    """Remove directories left by cano_mp processes that are gone; return what was removed.

    Runs once per process unless ``force``.
    """
    global _janitor_done
    if _janitor_done and not force:
        return []
    _janitor_done = True
    removed = []
    own = _tag()
    for path in _candidates():
        name = os.path.basename(path)
        if name == own or _owner_alive(name):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
        log.info("removed shared memory left by a dead cano_mp process: %s", path)
    return removed
