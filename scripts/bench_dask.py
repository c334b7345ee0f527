"""Benchmarks of cano_mp on Dask: the ``fanout`` and ``tiny`` cases on a LocalCluster.

    python scripts/bench_dask.py              # both cases
    python scripts/bench_dask.py --repeat 9   # more timed repetitions
    python scripts/bench.py dask              # the same, once wired into bench.py

On ``LocalCluster(n_workers=N, threads_per_worker=1, processes=True)``, measured in the same
run and interleaved (see ``bench.measure``):

    fanout   one split of 1,000 trivial branches: cano on Dask (default max_workers, and a
             deeper queue), plain ``client.map`` + ``gather`` of the same function on the
             same cluster, cano on its own loky pool, raw loky submit/gather
    tiny     100,000 items of x * 2 in a BatchTask: cano on Dask; ``client.map`` over chunks
             of Pool.map's default size (results pickled, and as plain lists), and one task
             per item (on a sample); cano on its own loky pool

Goal: cano on Dask within 1.3x of plain ``client.map``. Prints, never asserts.
"""

from __future__ import annotations

import argparse
import pickle
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from cano_mp import BatchTask, JoinConfig, JoinStrategy, SharedStore, Workflow

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ != "__main__":
    # Imported by bench.py: the functions below must still travel by value, since the
    # workers cannot import this script.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _host() -> Any:
    """bench.py's helpers: its own module when it runs us, else imported."""
    main = sys.modules.get("__main__")
    if main is not None and hasattr(main, "measure") and hasattr(main, "Opts"):
        return main
    import bench

    return bench


FANOUT = 1000
TINY = 100_000
SAMPLE = 1000  # items of the one-task-per-item client.map (all 100,000 would take minutes)
QUEUE_FACTOR = 8  # the deeper-queue variant: max_workers = 8 x the cluster's threads


def trivial(i: int) -> int:
    return i + 1


def leaf(store: Any) -> str:
    return "done"


def double(x: int) -> int:
    return x * 2


def double_list(start: int, stop: int) -> list[int]:
    return [x * 2 for x in range(start, stop)]


def double_pickled(start: int, stop: int) -> bytes:
    # Dask serialises a list of ints element by element (~1.7 s for these 100,000 on the
    # 2-CPU machine this was written on): one pickle is what a Dask user would send.
    return pickle.dumps([x * 2 for x in range(start, stop)], protocol=5)


class Double(BatchTask[str, int, int]):
    """``x * 2`` over ``range(store["n"])``."""

    next_states = ("done",)
    progress = False

    def load(self, store: Any) -> Any:
        return range(store["n"])

    def process(self, item: int) -> int:
        return item * 2

    def finish(self, store: Any, results: list[int]) -> str:
        store["out"] = len(results)
        return "done"


def _fanout_flow(executor: Any) -> Workflow[str]:
    flow: Workflow[str] = Workflow(start="split", executor=executor, name="fanout")
    flow.register_split("split", [leaf] * FANOUT, JoinConfig(JoinStrategy.all(), "done"))
    return flow.add_exit_state("done")


def _tiny_flow(executor: Any) -> Workflow[str]:
    flow: Workflow[str] = Workflow(start="map", executor=executor, name="batch")
    return flow.register("map", Double()).add_exit_state("done")


def case_dask(o: Any) -> None:
    """The ``fanout`` and ``tiny`` cases on a Dask LocalCluster beside client.map and loky."""
    from distributed import Client, LocalCluster

    from cano_mp.dask import DaskExecutor

    b = _host()
    n = o.workers
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    try:
        client.wait_for_workers(n)
        ex = DaskExecutor(client)
        deep = DaskExecutor(client, max_workers=QUEUE_FACTOR * ex.max_workers)
        _fanout(b, o, client, ex, deep)
        _tiny(b, o, client, ex)
        ex.close()
        deep.close()
    finally:
        client.close()
        cluster.close()


def _fanout(b: Any, o: Any, client: Any, ex: Any, deep: Any) -> None:
    n = o.workers
    b.header(
        "dask fanout",
        f"one split of {FANOUT:,} trivial branches, LocalCluster({n} workers x 1 thread)",
    )
    on_dask, on_deep = _fanout_flow(ex), _fanout_flow(deep)
    on_loky = _fanout_flow(b.cano_executor(n))
    lk = b.loky_executor(n)

    def run(flow: Workflow[str], store: SharedStore) -> Callable[[], None]:
        def go() -> None:
            assert flow.orchestrate(store=store) == "done"

        return go

    def client_map() -> None:
        futures = client.map(trivial, range(FANOUT), pure=False)
        client.gather(futures)

    with SharedStore() as s1, SharedStore() as s2, SharedStore() as s3:
        t = b.measure(
            {
                "dask": run(on_dask, s1),
                "deep": run(on_deep, s2),
                "map": client_map,
                "cano": run(on_loky, s3),
                "loky": b.burst(lambda i: lk.submit(trivial, i), lambda f: f.result(), FANOUT),
            },
            o.reps(5),
            warmup=1,
        )
    dask, deep_t, cmap, cano, loky = (
        t[k] / FANOUT for k in ("dask", "deep", "map", "cano", "loky")
    )
    b.row(f"cano_mp split on Dask (max_workers={ex.max_workers}), per branch", b.fmt_time(dask))
    b.row(
        f"cano_mp split on Dask (max_workers={deep.max_workers}), per branch",
        b.fmt_time(deep_t),
    )
    b.row("client.map + gather on the same cluster, per call", b.fmt_time(cmap))
    b.row("cano_mp split on its loky pool, per branch", b.fmt_time(cano))
    b.row("loky submit all, then gather, per call", b.fmt_time(loky))
    b.ratio("cano on Dask / client.map", dask / cmap, "≤ 1.30x", dask / cmap <= 1.3)
    b.ratio(
        f"cano on Dask, max_workers={deep.max_workers} / client.map",
        deep_t / cmap,
        "≤ 1.30x",
        deep_t / cmap <= 1.3,
    )
    b.ratio("cano on Dask / cano on loky", dask / cano)
    b.ratio("client.map / loky", cmap / loky)


def _tiny(b: Any, o: Any, client: Any, ex: Any) -> None:
    n = o.workers
    b.header("dask tiny", f"{TINY:,} items of x * 2, LocalCluster({n} workers x 1 thread)")
    chunk = -(-TINY // (4 * n))  # multiprocessing.Pool.map's own default
    starts = list(range(0, TINY, chunk))
    stops = [min(i + chunk, TINY) for i in starts]
    on_dask, on_loky = _tiny_flow(ex), _tiny_flow(b.cano_executor(n))

    def run(flow: Workflow[str], store: SharedStore) -> Callable[[], None]:
        def go() -> None:
            assert flow.orchestrate(store=store) == "done"
            assert store["out"] == TINY

        return go

    def map_pickled() -> None:
        parts = client.gather(client.map(double_pickled, starts, stops, pure=False))
        assert sum(len(pickle.loads(p)) for p in parts) == TINY

    def map_lists() -> None:
        parts = client.gather(client.map(double_list, starts, stops, pure=False))
        assert sum(len(p) for p in parts) == TINY

    def map_items() -> None:
        client.gather(client.map(double, range(SAMPLE), pure=False))

    with SharedStore() as s1, SharedStore() as s2:
        s1["n"] = s2["n"] = TINY
        t = b.measure(
            {
                "dask": run(on_dask, s1),
                "pickled": map_pickled,
                "lists": map_lists,
                "items": map_items,
                "cano": run(on_loky, s2),
            },
            o.reps(5),
            warmup=1,
        )
    dask, pickled, lists, cano = (t[k] / TINY for k in ("dask", "pickled", "lists", "cano"))
    items = t["items"] / SAMPLE
    b.row("cano_mp BatchTask on Dask (auto chunks), per item", b.fmt_time(dask))
    b.row(f"client.map, {len(starts)} chunks of {chunk:,}, results pickled", b.fmt_time(pickled))
    b.row(f"client.map, {len(starts)} chunks of {chunk:,}, results as lists", b.fmt_time(lists))
    b.row(f"client.map, one task per item ({SAMPLE:,}-item sample)", b.fmt_time(items))
    b.row("cano_mp BatchTask on its loky pool, per item", b.fmt_time(cano))
    b.ratio(
        "cano on Dask / client.map (chunks, pickled)",
        dask / pickled,
        "≤ 1.30x",
        dask / pickled <= 1.3,
    )
    b.ratio("cano on Dask / client.map (chunks, lists)", dask / lists)
    b.ratio("cano on Dask / client.map (per item)", dask / items)
    b.ratio("cano on Dask / cano on loky", dask / cano)


def main(argv: list[str] | None = None) -> int:
    b = _host()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=None, help="timed repetitions")
    parser.add_argument("--workers", type=int, default=2, help="Dask workers (default 2)")
    args = parser.parse_args(argv)
    o = b.Opts(args.repeat, args.workers, False)
    try:
        case_dask(o)
    finally:
        b._shutdown_pools()
    return 0


if __name__ == "__main__":
    sys.exit(main())
