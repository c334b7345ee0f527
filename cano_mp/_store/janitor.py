"""The janitor: remove what cano_mp processes killed by SIGKILL left in shared memory.

Every cano_mp process that touches shared memory runs :func:`run_janitor` once (a store,
a pool, a Dask worker's directories). It lists the ``cano_mp-*`` directories of the roots
``shm`` uses (see its docstring for the layout) and removes one only when:

- it is a real directory owned by our uid (``lstat``; nothing is followed), and
- its owner is gone: the janitor can take the ``flock`` on its ``.owner.lock`` (the kernel
  drops it when the owner dies, whatever PID namespace it ran in), or, for a directory
  without a lock file, it is older than :data:`YOUNG_DIR_SECONDS` and its name does not
  match a live process (directories of cano_mp 0.1).

Before removing a directory it kills what is left of the dead owner's worker process groups
(``.groups``): processes of our uid in one of those groups that carry the owner's
directory name in ``CANO_MP_OWNER`` (a reused process-group id is not the dead owner's).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
from collections.abc import Iterator

from .shm import (
    _O_DIRECTORY,
    _O_NOFOLLOW,
    GROUPS_NAME,
    LOCK_NAME,
    OWNER_ENV,
    PREFIX,
    _roots,
    log,
    own_dirs,
)

__all__ = ["YOUNG_DIR_SECONDS", "run_janitor"]

# A process directory without a lock file is being made: leave it alone this long.
YOUNG_DIR_SECONDS = 60.0

_janitor_done = False


def _candidates() -> Iterator[str]:
    for root in _roots():
        try:
            names = os.listdir(root)
        except OSError:
            continue
        for name in names:
            if name.startswith(PREFIX):
                yield os.path.join(root, name)


def _take_dead_owner_lock(path: str) -> int | None:
    """An fd holding the owner lock of ``path`` if its owner is gone, else None.

    Only real directories of our uid are considered; nothing is followed.
    """
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
        return None
    try:
        dfd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fd = os.open(LOCK_NAME, os.O_RDWR | _O_NOFOLLOW, dir_fd=dfd)
        except FileNotFoundError:
            return _legacy_or_young(path, st)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return None  # alive (in this PID namespace or another)
        return fd
    finally:
        os.close(dfd)


def _legacy_or_young(path: str, st: os.stat_result) -> int | None:
    # No lock file: a directory of cano_mp 0.1 (named by pid and start time), or one whose
    # owner is between mkdir and creating its lock.
    import time

    if time.time() - st.st_mtime < YOUNG_DIR_SECONDS:
        return None
    name = os.path.basename(path)
    try:
        pid_s, start_s = name[len(PREFIX) :].split("-", 1)
        pid, start = int(pid_s), int(start_s)
    except ValueError:
        return -1  # an old, unlocked directory of ours with a random name: dead
    import psutil

    try:
        created = int(psutil.Process(pid).create_time() * 100)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return -1
    except psutil.Error:
        return None
    return None if abs(created - start) <= 1 else -1


def _kill_leftover_groups(path: str) -> None:
    """Kill what is left of a dead owner's worker process groups (children of its tasks)."""
    try:
        fd = os.open(os.path.join(path, GROUPS_NAME), os.O_RDONLY | _O_NOFOLLOW)
    except OSError:
        return
    try:
        groups = {int(x) for x in os.read(fd, 1 << 20).split() if x.isdigit()}
    finally:
        os.close(fd)
    if not groups:
        return
    import psutil

    marker = os.path.basename(path)
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != os.getuid():
                continue
            if os.getpgid(proc.pid) not in groups:
                continue
            if proc.environ().get(OWNER_ENV) != marker:
                continue  # a reused process-group id: not the dead owner's
            proc.kill()
            log.info("killed process %s left by a dead cano_mp process's task", proc.pid)
        except (psutil.Error, OSError):
            continue


def run_janitor(force: bool = False) -> list[str]:
    """Remove directories left by cano_mp processes that are gone; return what was removed.

    Runs once per process unless ``force``.
    """
    global _janitor_done
    if _janitor_done and not force:
        return []
    _janitor_done = True
    removed = []
    own = own_dirs()
    for path in _candidates():
        if path in own:
            continue
        fd = _take_dead_owner_lock(path)
        if fd is None:
            continue
        try:
            _kill_leftover_groups(path)
            shutil.rmtree(path, ignore_errors=True)  # fd-based: never follows symlinks
        finally:
            if fd >= 0:
                os.close(fd)
        if not os.path.lexists(path):
            removed.append(path)
            log.info("removed shared memory left by a dead cano_mp process: %s", path)
    return removed
