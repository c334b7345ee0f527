"""Progress bars (tqdm.auto: a widget in Jupyter, text on a terminal)."""

from __future__ import annotations

import sys
from typing import Protocol

__all__ = ["ProgressBar", "progress_bar", "wants_progress"]


class ProgressBar(Protocol):
    def update(self, n: float | None = 1, /) -> bool | None: ...

    def close(self) -> None: ...


def _in_jupyter() -> bool:
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        ip = shell.get_ipython()
    except Exception:
        return False
    return ip is not None and type(ip).__name__ == "ZMQInteractiveShell"


def wants_progress(progress: bool | None) -> bool:
    """``progress`` when set; otherwise on when stderr is a terminal or in Jupyter."""
    if progress is not None:
        return bool(progress)
    try:
        tty = sys.stderr is not None and sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return tty or _in_jupyter()


def progress_bar(
    progress: bool | None, total: int | None, desc: str, unit: str
) -> ProgressBar | None:
    """A tqdm bar, or ``None`` when progress is off (or tqdm cannot be imported)."""
    if not wants_progress(progress):
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm is a dependency
        return None
    # leave=True: a finished bar stays with its final count (a notebook keeps the widget).
    bar: ProgressBar = tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)
    return bar
