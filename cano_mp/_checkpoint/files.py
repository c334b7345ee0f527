"""Data files beside a checkpoint database.

::

    runs.db                  the SQLite database (0600)
    runs.db.data/            data files (0700, ours, checked before every use)
        <name>               the bytes of one large store value (0600), never rewritten
        .gc.lock             flock: writers share it, garbage collection takes it alone

A file is named by a random 128-bit token minted when it is written (``new_name``): no two
stores, processes or runs can mint the same one, and no hash of the bytes is needed (store
segments never change, so a segment's identity tells that its bytes did not; see
``capture``). Older databases name files by a blake2b of their bytes; both read the same.

A file is written to a temporary name, fsynced when durability asks for it, and renamed to
its name *before* the database row that refers to it commits: a crash at any moment leaves
either no file (the row was never written) or a complete one.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import mmap
import os
import secrets
import stat
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import cast

from .._errors import StoreError

__all__ = ["DataFiles", "is_disk_full", "preallocate"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
# Bytes hashed and written per system call: large enough to amortise the call, small enough
# not to double the memory of a 2 GB array.
_CHUNK = 8 * 1024 * 1024


def _bytes(data: memoryview) -> memoryview:
    return data.cast("B") if data.format != "B" or data.ndim != 1 else data


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def check_private(path: str, *, directory: bool) -> None:
    """Raise ``StoreError`` unless ``path`` is ours, not a link, and private to us (0700
    directory, or a regular file nobody else can write): checkpoints are unpickled."""
    st = os.lstat(path)
    kind = stat.S_ISDIR(st.st_mode) if directory else stat.S_ISREG(st.st_mode)
    problem = None
    if not kind:
        problem = f"is not a {'directory' if directory else 'regular file'} (a link?)"
    elif st.st_uid != os.geteuid():
        problem = f"is owned by uid {st.st_uid}, not by us ({os.geteuid()})"
    elif directory and stat.S_IMODE(st.st_mode) != 0o700:
        problem = f"has mode {stat.S_IMODE(st.st_mode):o}, not 700"
    elif not directory and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = "can be written by others"
    if problem is not None:
        raise StoreError(f"refusing to use checkpoint data {path}: it {problem}")


class DataFiles:
    """The data directory of one checkpoint database."""

    def __init__(self, folder: str, *, fsync: bool) -> None:
        self.folder = folder
        self.fsync = fsync
        try:
            os.mkdir(folder, 0o700)
        except FileExistsError:
            pass
        check_private(folder, directory=True)
        self._lock_path = os.path.join(folder, ".gc.lock")

    def path(self, digest: str) -> str:
        return os.path.join(self.folder, digest)

    @staticmethod
    def new_name() -> str:
        """A name for a new data file that no store, process or run will mint again."""
        return secrets.token_hex(16)

    def has(self, digest: str) -> bool:
        return os.path.exists(self.path(digest))

    @contextmanager
    def lock(self, exclusive: bool) -> Iterator[None]:
        """Writers hold it shared from writing files until their row commits; garbage
        collection holds it alone, so it never removes a file a row is about to name."""
        fd = os.open(self._lock_path, os.O_CREAT | os.O_RDWR | _O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the flock

    def write(self, digest: str, data: memoryview) -> int:
        """Make sure the file ``digest`` holds ``data``; return the bytes written (0 when it
        was there already). ENOSPC: ``StoreError``, nothing left behind."""
        target = self.path(digest)
        if os.path.exists(target):
            return 0
        view = _bytes(data)
        tmp = os.path.join(self.folder, f".{digest[:16]}.{secrets.token_hex(6)}.tmp")
        with self._space(view.nbytes):
            self._write_file(tmp, view)
        os.rename(tmp, target)
        if self.fsync:
            self.sync_folder()
        return view.nbytes

    def _write_file(self, tmp: str, view: memoryview) -> None:
        """Write ``view`` to the new file ``tmp`` (fsynced if asked); on any failure remove
        it."""
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW, 0o600)
        try:
            preallocate(fd, view.nbytes)
            done = 0
            while done < view.nbytes:
                done += os.write(fd, view[done : done + _CHUNK])
            if self.fsync:
                os.fsync(fd)
            os.close(fd)
            fd = -1
        except BaseException:
            if fd >= 0:
                os.close(fd)
            _unlink(tmp)
            raise

    @contextmanager
    def _space(self, nbytes: int) -> Iterator[None]:
        """Turn ENOSPC into a ``StoreError`` that says what to do."""
        try:
            yield
        except OSError as exc:
            if is_disk_full(exc):
                raise StoreError(
                    f"checkpoint failed: no space left in {self.folder} for {nbytes} "
                    "bytes; the previous checkpoint is still valid. Free some space and "
                    "resume the run"
                ) from exc
            raise

    def sync_folder(self) -> None:
        fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def map(self, digest: str, nbytes: int) -> mmap.mmap:
        """Data file ``digest`` mapped read-only, checked first (ours, private, its size)."""
        path = self.path(digest)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW)
        except FileNotFoundError:
            raise StoreError(
                f"checkpoint data file {path} is missing: the checkpoint cannot be restored"
            ) from None
        try:
            st = os.fstat(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_uid != os.geteuid()
                or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
                or st.st_size != nbytes
            ):
                raise StoreError(
                    f"refusing to read checkpoint data file {path}: not a private regular "
                    f"file of ours holding {nbytes} bytes"
                )
            return mmap.mmap(fd, max(nbytes, 1), access=mmap.ACCESS_READ)
        finally:
            os.close(fd)

    def same(self, digest: str, data: memoryview) -> bool:
        """Whether data file ``digest`` holds exactly ``data`` (compared 8 MB at a time;
        far cheaper than hashing ``data``)."""
        import numpy as np

        view = _bytes(data)
        try:
            mm = self.map(digest, view.nbytes)
        except StoreError:
            return False
        try:
            a = np.frombuffer(mm, np.uint8, count=view.nbytes)
            b = np.frombuffer(view, np.uint8)
            equal = all(
                np.array_equal(a[i : i + _CHUNK], b[i : i + _CHUNK])
                for i in range(0, view.nbytes, _CHUNK)
            )
            del a, b  # release the map before it closes
            return equal
        finally:
            mm.close()

    def names(self) -> list[str]:
        return [n for n in os.listdir(self.folder) if not n.startswith(".")]

    def remove(self, digests: set[str]) -> None:
        for d in digests:
            _unlink(self.path(d))

    def remove_stale_temps(self) -> None:
        for n in os.listdir(self.folder):
            if n.endswith(".tmp"):
                _unlink(os.path.join(self.folder, n))


def preallocate(fd: int, nbytes: int) -> None:
    """Reserve the blocks of a file about to get ``nbytes`` (as numpy's ``tofile`` does):
    ext4 writes 200 MB into a reserved extent in 27 ms instead of 39 here. Linux
    ``fallocate(2)`` with ``FALLOC_FL_KEEP_SIZE``, not ``os.posix_fallocate``, which glibc
    emulates by writing every block where a filesystem has no fallocate. Any refusal only
    costs the speed."""
    fallocate = _fallocate()
    if fallocate is not None and nbytes > 0:
        fallocate(fd, _FALLOC_FL_KEEP_SIZE, 0, nbytes)  # -1 (EOPNOTSUPP...): plain writes


_FALLOC_FL_KEEP_SIZE = 1


@functools.cache
def _fallocate() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):  # pragma: no cover - a libc without fallocate
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return cast("Callable[[int, int, int, int], int]", fn)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
