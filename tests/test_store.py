"""SharedStore: the mapping contract, shared memory, isolation and leaks."""

from __future__ import annotations

import os
import pickle
import pickletools
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from enum import Enum

import cloudpickle
import numpy as np
import pytest

from cano_mp import ConfigError, InlineExecutor, SharedStore, StoreError, StoreKeyError, Workflow
from cano_mp._store import (
    Append,
    Clear,
    Delete,
    DriverStore,
    Put,
    ReadOnlyStore,
    SnapshotData,
    TaskStore,
    janitor,
    log_from_wire,
    log_to_wire,
)
from cano_mp._store import shm as _shm
from cano_mp._store.byvalue import (
    hold_snapshot,
    pack_log,
    read_segment,
    release_snapshot,
    unpack_log,
    value_snapshot,
)


def segment_files(store: SharedStore) -> list[str]:
    files = []
    for d in store._dirs:
        if d is not None and os.path.isdir(d):
            files.extend(os.path.join(d, f) for f in os.listdir(d))
    return files


def test_mapping_basics(store: SharedStore) -> None:
    store.put("a", 1)
    store["b"] = {"x": [1, 2]}
    assert store.get("a") == 1 and store["b"] == {"x": [1, 2]}
    assert store.get("missing") is None and store.get("missing", 7) == 7
    assert "a" in store and "zzz" not in store and 3 not in store
    assert len(store) == 2 and store.keys() == ["a", "b"] and list(store) == ["a", "b"]
    store.remove("a")
    del store["b"]
    assert len(store) == 0


def test_missing_key_is_store_key_error_and_key_error(store: SharedStore) -> None:
    store["present"] = 1
    with pytest.raises(StoreKeyError, match="present") as info:
        store["absent"]
    assert isinstance(info.value, KeyError)
    with pytest.raises(KeyError):
        store.remove("absent")
    with pytest.raises(StoreKeyError):
        del store["absent"]


def test_values_are_copies(store: SharedStore) -> None:
    store["l"] = [1, 2]
    got = store["l"]
    got.append(3)
    assert store["l"] == [1, 2]


def test_append_creates_then_extends(store: SharedStore) -> None:
    store.append("log", "a")
    store.append("log", "b")
    assert store["log"] == ["a", "b"]
    store["n"] = 5
    with pytest.raises(StoreError, match="not a list"):
        store.append("n", 1)


def test_clear(store: SharedStore) -> None:
    store["a"] = 1
    store["arr"] = np.ones(100_000)
    store.clear()
    assert len(store) == 0 and segment_files(store) == []


def test_non_str_key_is_rejected(store: SharedStore) -> None:
    with pytest.raises(StoreError, match="str"):
        store.put(1, "x")  # type: ignore[arg-type]
    with pytest.raises(StoreError):
        store[("a",)] = 1  # type: ignore[index]


def test_unpicklable_value_fails_at_put_naming_the_key(store: SharedStore) -> None:
    with pytest.raises(StoreError, match="'lock'"):
        store.put("lock", threading.Lock())
    assert "lock" not in store


def test_large_arrays_live_in_shared_memory_read_only(store: SharedStore) -> None:
    arr = np.arange(1_000_000, dtype=np.float64)
    store["arr"] = arr
    files = segment_files(store)
    assert len(files) == 1
    path = files[0]
    if os.path.isdir("/dev/shm"):
        assert path.startswith("/dev/shm/") and "cano" in path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(os.path.dirname(os.path.dirname(path))).st_mode) == 0o700
    got = store["arr"]
    assert np.array_equal(got, arr)
    assert not got.flags.writeable
    with pytest.raises(ValueError):
        got[0] = 1.0


def test_small_values_stay_out_of_shared_memory(store: SharedStore) -> None:
    store["small"] = np.arange(10)
    store["s"] = "text"
    assert segment_files(store) == []


def test_non_contiguous_arrays_are_made_contiguous(store: SharedStore) -> None:
    base = np.arange(2_000_000, dtype=np.float64)
    store["strided"] = base[::2]
    assert len(segment_files(store)) == 1
    assert np.array_equal(store["strided"], base[::2])


def test_overwritten_segments_are_freed(store: SharedStore) -> None:
    store["arr"] = np.ones(500_000)
    first = segment_files(store)
    store["arr"] = np.zeros(500_000)
    second = segment_files(store)
    assert len(second) == 1 and second != first
    store.remove("arr")
    assert segment_files(store) == []


def test_snapshot_keeps_segments_alive_until_dropped(store: SharedStore) -> None:
    store["arr"] = np.ones(500_000)
    snap = store._take_snapshot()
    store.remove("arr")
    assert len(segment_files(store)) == 1
    del snap
    assert segment_files(store) == []


def test_snapshot_index_serialised_once_per_version(store: SharedStore) -> None:
    store["a"] = 1
    s1 = store._take_snapshot()
    assert store._take_snapshot() is s1
    assert s1.serialised() is s1.serialised()
    store["b"] = 2
    assert store._take_snapshot() is not s1


def test_array_allocates_writable_shared_array(store: SharedStore) -> None:
    out = store.array("out", (100, 1000), "float32")
    assert out.flags.writeable and out.dtype == np.float32 and out.shape == (100, 1000)
    out[5, :] = 3.0
    got = store["out"]
    assert got[5, 0] == 3.0 and not got.flags.writeable
    assert len(segment_files(store)) == 1  # storing the array did not copy it


def test_close_releases_everything_and_is_idempotent() -> None:
    s = SharedStore()
    s["arr"] = np.ones(1_000_000)
    s.array("b", 100_000)
    dirs = [d for d in s._dirs if d is not None and os.path.isdir(d)]
    assert dirs
    s.close()
    s.close()
    assert all(not os.path.exists(d) for d in dirs)
    with pytest.raises(StoreError, match="closed"):
        s["x"] = 1


def test_context_manager_closes() -> None:
    with SharedStore() as s:
        s["arr"] = np.ones(1_000_000)
        d = [x for x in s._dirs if x is not None and os.path.isdir(x)]
    assert s.closed and not any(os.path.exists(x) for x in d)


def test_store_cannot_be_pickled_into_a_task(store: SharedStore) -> None:
    import cloudpickle

    with pytest.raises(StoreError, match="argument"):
        cloudpickle.dumps(store)


def test_repr_is_helpful(store: SharedStore) -> None:
    store["arr"] = np.ones(1_000_000)
    store["k"] = 1
    assert "2 keys" in repr(store) and "MiB" in repr(store)


def test_task_view_isolation_and_write_log(store: SharedStore) -> None:
    store["a"] = 1
    store["l"] = [1]
    snap = store._take_snapshot()
    view = TaskStore(snap.data(), "ttest1")
    view["a"] = 2
    view.append("l", 2)
    view["big"] = np.ones(300_000)
    assert view["a"] == 2 and view["l"] == [1, 2]
    assert store["a"] == 1  # not committed yet
    log = view._finish(True)
    store._commit(log)
    assert store["a"] == 2 and store["l"] == [1, 2]
    assert np.array_equal(store["big"], np.ones(300_000))


def test_failed_view_discards_its_segments(store: SharedStore) -> None:
    view = TaskStore(store._take_snapshot().data(), "tfail")
    view["big"] = np.ones(300_000)
    assert len(segment_files(store)) == 1
    assert view._finish(False) == []
    assert segment_files(store) == []


def test_numpy_is_not_imported_by_cano_mp() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, cano_mp; print('numpy' in sys.modules)"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False"


def test_janitor_removes_directories_of_a_killed_owner(tmp_path: object) -> None:
    script = textwrap.dedent(
        """
        import os, sys, time, numpy as np
        from cano_mp import SharedStore
        s = SharedStore()
        s["arr"] = np.ones(1_000_000)
        print(s._dirs[0] or s._dirs[1], flush=True)
        time.sleep(60)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        store_dir = proc.stdout.readline().strip()
        assert os.listdir(store_dir)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    owner_dir = os.path.dirname(store_dir)
    assert os.path.isdir(owner_dir)  # SIGKILL: no atexit ran
    removed = janitor.run_janitor(force=True)
    assert owner_dir in removed and not os.path.exists(owner_dir)


def test_janitor_keeps_directories_of_live_processes() -> None:
    s = SharedStore()
    try:
        s["arr"] = np.ones(1_000_000)
        janitor.run_janitor(force=True)
        assert s["arr"].sum() == 1_000_000
    finally:
        s.close()


def test_nothing_left_after_interpreter_exit() -> None:
    script = textwrap.dedent(
        """
        import numpy as np
        from cano_mp import SharedStore
        s = SharedStore()
        s["arr"] = np.ones(1_000_000)
        s.array("b", 10_000)
        import os
        print(os.path.dirname(s._dirs[0] or s._dirs[1]))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(out.stdout.strip())


def test_fallback_to_disk_when_shared_memory_is_full(
    store: SharedStore, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(_shm, "SHM_FREE_MARGIN", 1 << 62)
    monkeypatch.setattr(_shm, "_warned_fallback", False)
    store["arr"] = np.ones(500_000)
    files = segment_files(store)
    assert len(files) == 1 and not files[0].startswith("/dev/shm")
    assert np.array_equal(store["arr"], np.ones(500_000))
    assert "lacks room" in caplog.text


def test_appending_a_large_item_in_a_task_leaves_only_the_lists_segments(
    executor: object,
) -> None:
    np = pytest.importorskip("numpy")
    from enum import Enum

    from cano_mp import Workflow

    class S(Enum):
        A = 1
        DONE = 2

    def add(store: SharedStore) -> S:
        store.append("parts", np.ones(100_000))
        return S.DONE

    with SharedStore() as store:
        flow = Workflow(executor=executor).register(S.A, add).add_exit_state(S.DONE)
        for _ in range(3):
            flow.orchestrate(S.A, store=store)
        assert len(store["parts"]) == 3
        live = {p for e in store._entries.values() for seg in e[1] for p in [seg.path]}
        assert set(segment_files(store)) == live


# -- one interface: the driver's store and a task's view --------------------------------------


class Kind(Enum):
    A = 1
    DONE = 2


def record_what_the_task_got(store: SharedStore) -> Kind:
    store["is_shared_store"] = isinstance(store, SharedStore)
    store["driver_machinery"] = [
        n for n in ("_commit", "_take_snapshot", "_run_lock", "_entries") if hasattr(store, n)
    ]
    return Kind.DONE


def test_a_task_receives_a_shared_store_without_the_drivers_machinery(
    executor: object, store: SharedStore
) -> None:
    flow = Workflow(executor=executor).register(Kind.A, record_what_the_task_got)
    flow.add_exit_state(Kind.DONE).orchestrate(Kind.A, store=store)
    assert store["is_shared_store"] is True
    assert store["driver_machinery"] == []


def test_shared_store_builds_the_drivers_store_and_names_its_public_home() -> None:
    with SharedStore() as s:
        assert isinstance(s, SharedStore) and isinstance(s, DriverStore)
        view = ReadOnlyStore(s._take_snapshot().data(), "tro")
        assert isinstance(view, SharedStore) and not isinstance(view, DriverStore)
    assert repr(SharedStore) == "<class 'cano_mp.SharedStore'>"
    assert pickle.loads(pickle.dumps(SharedStore)) is SharedStore
    assert cloudpickle.loads(cloudpickle.dumps(SharedStore)) is SharedStore


@pytest.mark.parametrize("cls", [DriverStore, TaskStore])
def test_every_store_implements_the_whole_interface(cls: type[SharedStore]) -> None:
    interface = ("put", "get", "remove", "append", "keys", "clear", "array", "close", "closed")
    for name in (*interface, "__contains__", "__len__", "__repr__"):
        assert getattr(cls, name) is not getattr(SharedStore, name), name


def test_a_tasks_view_cannot_be_the_store_of_a_run(store: SharedStore) -> None:
    view = TaskStore(store._take_snapshot().data(), "tnested")
    flow = Workflow(executor=InlineExecutor()).register(Kind.A, record_what_the_task_got)
    with pytest.raises(ConfigError, match=r"SharedStore\(\)"):
        flow.add_exit_state(Kind.DONE).orchestrate(Kind.A, store=view)
    assert "is_shared_store" not in store


# -- what crosses the process boundary: named records ----------------------------------------


def names_a_class(pickled: bytes) -> bool:
    return any(op.name in ("GLOBAL", "STACK_GLOBAL") for op, _, _ in pickletools.genops(pickled))


def test_the_write_log_is_named_records_sent_as_plain_tuples(store: SharedStore) -> None:
    store["gone"] = 1
    snapshot = store._take_snapshot()
    snap = snapshot.data()
    assert isinstance(snap, SnapshotData) and snap.store_uid and snap.index.keys() == {"gone"}
    sent = pickle.loads(snapshot.serialised())
    assert type(sent) is tuple and sent == snap and not names_a_class(snapshot.serialised())
    view = TaskStore(sent, "tlog")
    view["a"] = 1
    view["a"] = 2  # the first put is overwritten: compacted away
    view.append("l", 3)
    del view["gone"]
    view["big"] = np.ones(300_000)
    wire = view._finish(True)
    assert not names_a_class(pickle.dumps(wire))  # no class to look up on the other side
    log = log_from_wire(pickle.loads(pickle.dumps(wire)))
    assert [type(op) for op in log] == [Put, Append, Delete, Put]
    assert [op.key for op in log] == ["a", "l", "gone", "big"]
    assert log_to_wire(log) == wire
    store._commit(wire)
    assert store["a"] == 2 and store["l"] == [3] and "gone" not in store
    cleared = TaskStore(store._take_snapshot().data(), "tclear")
    cleared.clear()
    assert log_from_wire(cleared._finish(True)) == [Clear()]


def test_a_snapshot_and_a_log_travel_by_value(store: SharedStore) -> None:
    store["arr"] = np.arange(100_000.0)
    shipped = value_snapshot(store._take_snapshot().data())
    data = hold_snapshot(shipped, [read_segment(ref) for ref in shipped.sources])
    try:
        assert isinstance(data, SnapshotData) and data.store_uid == shipped.store_uid
        view = TaskStore(data, "tbyvalue")
        assert view["arr"].sum() == np.arange(100_000.0).sum()
        view["out"] = view["arr"] * 2
        packed, segments = pack_log(view._finish(True))
    finally:
        release_snapshot(shipped)
    assert segments and not any(os.path.exists(p) for p in segments)  # read, then deleted
    log = unpack_log(packed, segments, store._dirs)
    assert [type(op) for op in log_from_wire(log)] == [Put]
    store._commit(log)
    assert np.array_equal(store["out"], np.arange(100_000.0) * 2)
