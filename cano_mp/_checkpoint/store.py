"""CheckpointStore: where runs record how far they got, with their store's contents.

One SQLite database in WAL mode (``synchronous=NORMAL``: survives a process crash; FULL with
``durability="fsync"``: survives a power loss) and a directory of data
files beside it (see ``files``). Tables::

    meta(key, value)                  schema_version
    runs(run_id, workflow, status, state, seq, started, updated,
         owner_pid, owner_start, owner_host, error, rolled_back)
    checkpoints(run_id, seq, state, created, entries, extra)     the run's last checkpoint
    refs(run_id, digest, nbytes)      data files its last checkpoint names

States are recorded by a stable name (an Enum member's name, else its ``repr``), never by
pickling them: an Enum defined in ``__main__`` is a different class in the next process.

The owner columns are a lease: a run is being run by the process ``owner_pid`` started at
``owner_start`` on ``owner_host``; a second process cannot resume it while that one lives,
and ``runs()`` tells such a live run from one whose owner died (a crash).
"""

from __future__ import annotations

import os
import pickle
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from .._errors import ConfigError, StoreError
from .._public import public
from .files import DataFiles, check_private, is_disk_full

__all__ = ["SCHEMA_VERSION", "CheckpointStore", "RunRecord", "Saved"]

SCHEMA_VERSION = 1

Status = Literal["running", "failed", "completed"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL,
    state TEXT, seq INTEGER NOT NULL DEFAULT 0, started REAL NOT NULL, updated REAL NOT NULL,
    owner_pid INTEGER, owner_start TEXT, owner_host TEXT, error TEXT,
    rolled_back INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS checkpoints (
    run_id TEXT PRIMARY KEY, seq INTEGER NOT NULL, state TEXT NOT NULL, created REAL NOT NULL,
    entries BLOB NOT NULL, extra BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS refs (run_id TEXT NOT NULL, digest TEXT NOT NULL,
    nbytes INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS refs_run ON refs(run_id);
CREATE INDEX IF NOT EXISTS refs_digest ON refs(digest);
"""

_active_lock = threading.Lock()
_active: set[tuple[str, str]] = set()  # (database, run_id) run by this process now


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # the command name (field 2) may hold spaces and parentheses: split after its last ')'
    return data[data.rindex(b")") + 2 :].split()[19].decode()


def _owner_alive(pid: int | None, start: str | None, host: str | None) -> bool:
    if pid is None:
        return False
    if host is not None and host != socket.gethostname():
        return True  # another machine's run: we cannot tell, so we must not take it
    now = _process_start(pid)
    if now is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return start is None
    return start is None or now == start


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run recorded in a :class:`CheckpointStore`.

    ``status`` is ``"running"`` (going, or crashed: ``live`` tells which), ``"failed"`` or
    ``"completed"``; ``state`` is the name of the last state entered (the final one when
    completed); ``started`` / ``updated`` are aware UTC datetimes.
    """

    run_id: str
    workflow: str
    status: Status
    state: str | None
    started: datetime
    updated: datetime
    seq: int = 0
    live: bool = False  # a process is running it now
    error: str | None = None
    resumable: bool = True


@dataclass(frozen=True, slots=True)
class Saved:
    """A run's last checkpoint as read back: what resuming it needs."""

    record: RunRecord
    seq: int
    state: str
    entries: dict[str, Any]
    extra: dict[str, Any]


class CheckpointStore:
    """Checkpoints of workflow runs: an embedded SQLite database at ``path`` and a directory
    of data files beside it (``path + ".data"``), both private to the user (0600 / 0700).

    ::

        wf = Workflow(start=S.LOAD, checkpoint="runs.db")
        wf.orchestrate(run_id="etl-1")          # crashes...
        wf.resume("etl-1")                      # ...goes on where it was, with its data
        CheckpointStore("runs.db").runs()       # [RunRecord(...)]

    ``durability="fsync"`` makes each checkpoint survive a power loss (data files fsynced,
    SQLite ``synchronous=FULL``); the default survives a crash of the process.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, durability: Literal["normal", "fsync"] = "normal"
    ) -> None:
        if durability not in ("normal", "fsync"):
            raise ConfigError(f"durability must be 'normal' or 'fsync', got {durability!r}")
        self.path = os.path.abspath(os.fspath(path))
        self.durability = durability
        self._local = threading.local()
        self._make_file()
        self.files = DataFiles(self.path + ".data", fsync=durability == "fsync")
        self._init_schema()

    # -- the database ------------------------------------------------------------------------
    def _make_file(self) -> None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            os.close(fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise ConfigError(f"cannot create checkpoint database {self.path}: {exc}") from exc
        check_private(self.path, directory=False)

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None or getattr(self._local, "pid", None) != os.getpid():
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            sync = "FULL" if self.durability == "fsync" else "NORMAL"
            db.execute(f"PRAGMA synchronous={sync}")
            self._local.db, self._local.pid = db, os.getpid()
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, taken at once (``BEGIN IMMEDIATE``): no lost updates."""
        db = self._db()
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise _db_error(self.path, exc) from exc
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise _db_error(self.path, exc) from exc

    def _init_schema(self) -> None:
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) != SCHEMA_VERSION:
                raise ConfigError(
                    f"checkpoint database {self.path} has schema version {row[0]}; this "
                    f"cano_mp reads version {SCHEMA_VERSION}"
                )

    # -- runs ----------------------------------------------------------------------------------
    def create_run(self, run_id: str, workflow: str) -> None:
        """Record a new run, owned by this process; an existing ``run_id`` is a ConfigError."""
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM runs WHERE run_id=?", (run_id,)).fetchone():
                raise ConfigError(
                    f"run id {run_id!r} already exists in {self.path}: resume it with "
                    "resume(run_id), or pick another id"
                )
            db.execute(
                "INSERT INTO runs (run_id, workflow, status, seq, started, updated, owner_pid, "
                "owner_start, owner_host) VALUES (?, ?, 'running', 0, ?, ?, ?, ?, ?)",
                (run_id, workflow, now, now, *_me()),
            )
        self._hold(run_id)

    def load(self, run_id: str) -> Saved | RunRecord:
        """A resumable run's last checkpoint (taking its lease), or the record of a run that
        needs no resuming (completed). Raises ConfigError for an unknown run, one a live
        process runs, one rolled back, or one that never reached its first checkpoint."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLS} FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise ConfigError(f"no run {run_id!r} in checkpoint database {self.path}")
            rec = _record(row)
            if rec.status == "completed":
                return rec
            if not rec.resumable:
                raise ConfigError(
                    f"run {run_id!r} failed and was rolled back (its compensations ran): it "
                    "cannot be resumed; start a new run"
                )
            if rec.live or self._is_active(run_id):
                raise ConfigError(
                    f"run {run_id!r} is being run by process {row[7]} right now: two "
                    "processes cannot resume one run"
                )
            ck = db.execute(
                "SELECT seq, state, entries, extra FROM checkpoints WHERE run_id=?", (run_id,)
            ).fetchone()
            if ck is None:
                raise ConfigError(f"run {run_id!r} has no checkpoint to resume from")
            db.execute(
                "UPDATE runs SET status='running', owner_pid=?, owner_start=?, owner_host=?, "
                "updated=? WHERE run_id=?",
                (*_me(), time.time(), run_id),
            )
        self._hold(run_id)
        # What a crash left in the data directory: a temp file cut short, or a file renamed
        # into place before the row naming it committed. Named by no row: removed.
        self.collect()
        return Saved(rec, ck[0], ck[1], pickle.loads(ck[2]), pickle.loads(ck[3]))

    def let_go(self, run_id: str) -> None:
        """Give up the lease on ``run_id`` without recording an outcome (a resume that
        could not start)."""
        try:
            with self._tx() as db:
                db.execute(
                    "UPDATE runs SET owner_pid=NULL, owner_start=NULL, owner_host=NULL "
                    "WHERE run_id=?",
                    (run_id,),
                )
        finally:
            self.release(run_id)

    def _hold(self, run_id: str) -> None:
        with _active_lock:
            if (self.path, run_id) in _active:
                raise ConfigError(f"run {run_id!r} is already being run by this process")
            _active.add((self.path, run_id))

    def _is_active(self, run_id: str) -> bool:
        with _active_lock:
            return (self.path, run_id) in _active

    def release(self, run_id: str) -> None:
        with _active_lock:
            _active.discard((self.path, run_id))

    def save(
        self,
        run_id: str,
        seq: int,
        state: str,
        entries: dict[str, Any],
        extra: dict[str, Any],
        refs: dict[str, int],
    ) -> set[str]:
        """Commit checkpoint ``seq`` (its data files are already written); return the data
        files the previous checkpoint named that this one does not (to collect)."""
        blob = pickle.dumps(entries, protocol=pickle.HIGHEST_PROTOCOL)
        more = pickle.dumps(extra, protocol=pickle.HIGHEST_PROTOCOL)
        now = time.time()
        with self._tx() as db:
            old = {r[0] for r in db.execute("SELECT digest FROM refs WHERE run_id=?", (run_id,))}
            db.execute("DELETE FROM refs WHERE run_id=?", (run_id,))
            db.executemany(
                "INSERT INTO refs VALUES (?, ?, ?)", [(run_id, d, n) for d, n in refs.items()]
            )
            db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, seq, state, now, blob, more),
            )
            db.execute(
                "UPDATE runs SET state=?, seq=?, updated=?, status='running' WHERE run_id=?",
                (state, seq, now, run_id),
            )
        return old - set(refs)

    def finish(
        self,
        run_id: str,
        status: Status,
        state: str | None,
        *,
        keep: bool,
        error: str | None = None,
        rolled_back: bool = False,
    ) -> None:
        """A run ended: record how, give up its lease; on success drop its data (unless
        ``keep``)."""
        try:
            with self._tx() as db:
                db.execute(
                    "UPDATE runs SET status=?, state=COALESCE(?, state), updated=?, error=?, "
                    "rolled_back=?, owner_pid=NULL, owner_start=NULL, owner_host=NULL "
                    "WHERE run_id=?",
                    (status, state, time.time(), error, int(rolled_back), run_id),
                )
                dropped: set[str] = set()
                if (status == "completed" and not keep) or rolled_back:
                    dropped = {
                        r[0]
                        for r in db.execute("SELECT digest FROM refs WHERE run_id=?", (run_id,))
                    }
                    db.execute("DELETE FROM refs WHERE run_id=?", (run_id,))
                    db.execute("DELETE FROM checkpoints WHERE run_id=?", (run_id,))
        finally:
            self.release(run_id)
        self.collect(dropped)

    def collect(self, digests: set[str] | None = None) -> None:
        """Remove the data files no checkpoint names (of ``digests``, or all of them)."""
        if digests is not None and not digests:
            return
        with self.files.lock(exclusive=True):
            db = self._db()
            if digests is None:
                self.files.remove_stale_temps()
                candidates = set(self.files.names())
            else:
                candidates = set(digests)
            used = {r[0] for r in db.execute("SELECT DISTINCT digest FROM refs")}
            self.files.remove(candidates - used)

    # -- what users call -------------------------------------------------------------------------
    def runs(self) -> list[RunRecord]:
        """Every recorded run, oldest first."""
        rows = self._db().execute(f"SELECT {_COLS} FROM runs ORDER BY started, run_id")
        return [_record(r) for r in rows]

    def get(self, run_id: str) -> RunRecord | None:
        """The record of ``run_id``, or None."""
        row = self._db().execute(f"SELECT {_COLS} FROM runs WHERE run_id=?", (run_id,)).fetchone()
        return None if row is None else _record(row)

    def delete(self, run_id: str) -> None:
        """Forget ``run_id`` and the data only it used; a run going on now is a ConfigError."""
        with self._tx() as db:
            row = db.execute(f"SELECT {_COLS} FROM runs WHERE run_id=?", (run_id,)).fetchone()
            if row is None:
                raise ConfigError(f"no run {run_id!r} in checkpoint database {self.path}")
            if _record(row).live or self._is_active(run_id):
                raise ConfigError(f"run {run_id!r} is going on now: it cannot be deleted")
            _delete_rows(db, [run_id])
        self.collect()

    def prune(self, older_than: float) -> list[str]:
        """Delete the runs not updated for ``older_than`` seconds (live ones are kept) and
        the data only they used; return their ids."""
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise ConfigError(f"older_than must be seconds, got {older_than!r}")
        if older_than != older_than or older_than < 0:
            raise ConfigError(f"older_than must be >= 0, got {older_than!r}")
        cutoff = time.time() - older_than
        with self._tx() as db:
            rows = db.execute(f"SELECT {_COLS} FROM runs WHERE updated < ?", (cutoff,))
            doomed = [
                r[0] for r in rows.fetchall() if not _record(r).live and not self._is_active(r[0])
            ]
            _delete_rows(db, doomed)
        self.collect()
        return doomed

    def close(self) -> None:
        """Close this thread's database connection (others close when collected)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    def __repr__(self) -> str:
        return f"CheckpointStore({self.path!r})"


_COLS = (
    "run_id, workflow, status, state, started, updated, seq, owner_pid, owner_start, "
    "owner_host, error, rolled_back"
)


def _record(row: tuple[Any, ...]) -> RunRecord:
    live = row[2] == "running" and _owner_alive(row[7], row[8], row[9])
    return RunRecord(
        run_id=row[0],
        workflow=row[1],
        status=row[2],
        state=row[3],
        started=datetime.fromtimestamp(row[4], UTC),
        updated=datetime.fromtimestamp(row[5], UTC),
        seq=row[6],
        live=live,
        error=row[10],
        resumable=row[2] != "completed" and not row[11],
    )


def _delete_rows(db: sqlite3.Connection, run_ids: list[str]) -> None:
    for table in ("refs", "checkpoints", "runs"):
        db.executemany(f"DELETE FROM {table} WHERE run_id=?", [(r,) for r in run_ids])


def _me() -> tuple[int, str | None, str]:
    pid = os.getpid()
    return pid, _process_start(pid), socket.gethostname()


def _db_error(path: str, exc: sqlite3.OperationalError) -> StoreError:
    text = str(exc)
    if "full" in text or is_disk_full(exc):
        return StoreError(
            f"checkpoint failed: the disk holding {path} is full ({text}); the previous "
            "checkpoint is still valid. Free some space and resume the run"
        )
    return StoreError(f"checkpoint database {path}: {text}")


public(CheckpointStore, RunRecord)
