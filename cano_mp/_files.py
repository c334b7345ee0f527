"""Files cano_mp writes for you (status files, traces): atomically, and through no path that
another user can redirect.

A temporary file with an unguessable name is created next to the target with
``O_CREAT|O_EXCL|O_NOFOLLOW`` (mode 0600 unless asked otherwise), written, then renamed over
the target. ``rename`` replaces a symlink at the target instead of writing through it.
"""

from __future__ import annotations

import os
import secrets

__all__ = ["write_atomic"]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


def write_atomic(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` atomically; the new file has ``mode``."""
    target = os.fspath(path)
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | _O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not change what the caller asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.close(fd)
        fd = -1
        os.replace(tmp, target)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
