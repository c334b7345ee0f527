"""The ``etl`` benchmark: CSV files parsed into numpy arrays, then three aggregations.

    python scripts/bench.py etl                          # via bench.py
    python scripts/bench_etl.py --mb 300 --files 240 --repeat 5

The data: ``--files`` CSV files (default 240) holding ``--mb`` MB in all (default 60; environment:
``CANO_BENCH_ETL_MB``, ``CANO_BENCH_ETL_FILES``),
generated once with a fixed seed (cached under the temp directory). Each row is
``id,cat,value,qty``.

The pipeline, the same for every engine, pools started beforehand:

1. parse every file in parallel into a structured numpy array (``np.loadtxt``), gather the
   arrays in the driver and join them into one table;
2. three aggregations in parallel over the table: revenue per category
   (``bincount`` of value * qty), count and mean value per category, and the 1/50/99 %
   quantiles of value.

Engines: cano_mp (a ``BatchTask`` whose results come back through shared memory, joined by
``store.concatenate`` into the store, then a 3-branch split reading the table zero-copy);
``multiprocessing.Pool`` (``map`` then three ``apply_async``); joblib (``Parallel`` twice: it
memory-maps the large table to its workers); Dask distributed (``LocalCluster`` with
processes: ``client.map`` + ``gather``, then the table ``scatter``-ed and three ``submit``).
Every engine's output must be byte-identical. Rounds are interleaved (see
``bench.measure``). Goal: cano_mp ≤ 0.85x Pool's time. Prints, never asserts (except the
identical outputs).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import cloudpickle

from cano_mp import BatchTask, JoinConfig, JoinStrategy, ProcessExecutor, SharedStore, Workflow

sys.path.insert(0, str(Path(__file__).resolve().parent))

if __name__ != "__main__":
    cloudpickle.register_pickle_by_value(sys.modules[__name__])

SEED = 20261201
CATS = 100
ROW_DTYPE = [("id", "<i8"), ("cat", "<i8"), ("value", "<f8"), ("qty", "<i8")]
BYTES_PER_ROW = 20  # about, as written below


# -- data ---------------------------------------------------------------------------------
def make_data(total_mb: float, files: int) -> list[str]:
    """The CSV files (made once per size, seed and count; reused by later runs)."""
    import numpy as np

    root = Path(tempfile.gettempdir()) / f"cano-bench-etl-{total_mb:g}mb-{files}-{SEED}"
    done = root / ".complete"
    paths = [str(root / f"part-{i:04d}.csv") for i in range(files)]
    if done.exists():
        return paths
    root.mkdir(parents=True, exist_ok=True)
    rows = max(1, int(total_mb * 1024 * 1024 / BYTES_PER_ROW / files))
    for i, path in enumerate(paths):
        rng = np.random.default_rng([SEED, i])
        ids = np.arange(i * rows, (i + 1) * rows, dtype=np.int64)
        cat = rng.integers(0, CATS, rows)
        value = np.round(rng.gamma(2.0, 50.0, rows), 4)
        qty = rng.integers(1, 20, rows)
        with open(path, "w") as f:
            f.write("id,cat,value,qty\n")
            np.savetxt(f, np.column_stack([ids, cat, value, qty]), fmt="%d,%d,%.4f,%d")
    done.touch()
    return paths


# -- the work every engine does -----------------------------------------------------------
def parse(path: str) -> Any:
    import numpy as np

    return np.loadtxt(path, delimiter=",", skiprows=1, dtype=ROW_DTYPE, ndmin=1)


def aggregate(which: int, table: Any) -> Any:
    import numpy as np

    cat = np.ascontiguousarray(table["cat"])
    value = np.ascontiguousarray(table["value"])
    if which == 0:
        return np.bincount(cat, weights=value * table["qty"], minlength=CATS)
    if which == 1:
        count = np.bincount(cat, minlength=CATS)
        return np.stack([count, np.bincount(cat, weights=value, minlength=CATS) / count])
    return np.quantile(value, [0.01, 0.5, 0.99])


def digest(outs: list[Any]) -> str:
    h = hashlib.sha256()
    for o in outs:
        h.update(o.tobytes())
    return h.hexdigest()


# -- cano_mp ------------------------------------------------------------------------------
class ParseFiles(BatchTask[str, str, Any]):
    next_states = ("aggregate",)

    def load(self, store: SharedStore) -> list[str]:
        paths: list[str] = store["paths"]
        return paths

    def process(self, path: str) -> Any:
        return parse(path)  # back through shared memory, not the pipe

    def finish(self, store: SharedStore, results: list[Any]) -> str:
        if hasattr(store, "concatenate"):
            store.concatenate("table", results)  # one copy, straight into shared memory
        else:  # an older cano_mp (before/after runs): join, then store (a second copy)
            import numpy as np

            store["table"] = np.concatenate(results)
        return "aggregate"


def synth(args: tuple[int, int]) -> Any:
    """A parsed file's worth of rows without the parsing: isolates how results travel."""
    import numpy as np

    i, rows = args
    out = np.zeros(rows, dtype=ROW_DTYPE)
    out["id"] = np.arange(i * rows, (i + 1) * rows)
    return out


class MakeTables(ParseFiles):
    next_states = ("done",)

    def load(self, store: SharedStore) -> list[Any]:
        items: list[Any] = store["items"]
        return items

    def process(self, item: Any) -> Any:
        return synth(item)

    def finish(self, store: SharedStore, results: list[Any]) -> str:
        super().finish(store, results)
        return "done"


def transport_cano(flow: Workflow[str], items: list[Any]) -> None:
    with SharedStore() as store:
        store["items"] = items
        flow.orchestrate(store=store)


def transport_pool(pool: Any, items: list[Any]) -> None:
    import numpy as np

    np.concatenate(pool.map(synth, items))


def agg_task(which: int) -> Any:
    def run(store: SharedStore) -> str:
        store[f"agg{which}"] = aggregate(which, store["table"])
        return "done"

    run.__name__ = f"aggregate{which}"
    return run


def cano_flow(ex: ProcessExecutor) -> Workflow[str]:
    flow: Workflow[str] = Workflow(start="parse", executor=ex, name="etl")
    flow.register("parse", ParseFiles())
    flow.register_split(
        "aggregate", [agg_task(k) for k in range(3)], JoinConfig(JoinStrategy.all(), "done")
    )
    return flow.add_exit_state("done")


def run_cano(flow: Workflow[str], paths: list[str]) -> list[Any]:
    with SharedStore() as store:
        store["paths"] = paths
        flow.orchestrate(store=store)
        return [store[f"agg{k}"].copy() for k in range(3)]


# -- peers --------------------------------------------------------------------------------
def run_pool(pool: Any, paths: list[str]) -> list[Any]:
    import numpy as np

    table = np.concatenate(pool.map(parse, paths))
    pending = [pool.apply_async(aggregate, (k, table)) for k in range(3)]
    return [p.get() for p in pending]


def run_joblib(n: int, paths: list[str]) -> list[Any]:
    import numpy as np
    from joblib import Parallel, delayed

    table = np.concatenate(Parallel(n_jobs=n)(delayed(parse)(p) for p in paths))
    return list(Parallel(n_jobs=n)(delayed(aggregate)(k, table) for k in range(3)))


def run_dask(client: Any, paths: list[str]) -> list[Any]:
    import numpy as np

    table = np.concatenate(client.gather(client.map(parse, paths, pure=False)))
    remote = client.scatter(table)
    out = client.gather([client.submit(aggregate, k, remote, pure=False) for k in range(3)])
    del remote
    return list(out)


# -- the case -----------------------------------------------------------------------------
def case_etl(o: Any, total_mb: float | None = None, files: int | None = None) -> None:
    import multiprocessing
    import time

    from bench import MP_CONTEXT, fmt_time, header, measure, ratio, row

    total_mb = total_mb or float(os.environ.get("CANO_BENCH_ETL_MB", "60"))
    files = files or int(os.environ.get("CANO_BENCH_ETL_FILES", "240"))
    n = o.workers
    header("etl", f"{files} CSV files, {total_mb:g} MB: parse in parallel, then 3 aggregations")
    t0 = time.perf_counter()
    paths = make_data(total_mb, files)
    size = sum(os.path.getsize(p) for p in paths) / 1024 / 1024
    row(f"data: {files} files, {size:.1f} MB (seed {SEED})", fmt_time(time.perf_counter() - t0))
    import cano_mp

    row("cano_mp from", os.path.dirname(os.path.dirname(cano_mp.__file__)))

    from dask.distributed import Client, LocalCluster

    ex = ProcessExecutor(max_workers=n, reuse=False).warm()
    flow = cano_flow(ex)
    pool = multiprocessing.get_context(MP_CONTEXT).Pool(n)
    cluster = LocalCluster(
        n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None
    )
    client = Client(cluster)
    outs: dict[str, str] = {}

    def check(name: str, result: list[Any]) -> None:
        d = digest(result)
        outs.setdefault(name, d)
        assert outs[name] == d, f"{name}: output changed between rounds"

    engines = {
        "cano": lambda: check("cano", run_cano(flow, paths)),
        "pool": lambda: check("pool", run_pool(pool, paths)),
        "joblib": lambda: check("joblib", run_joblib(n, paths)),
        "dask": lambda: check("dask", run_dask(client, paths)),
    }
    try:
        t = measure(engines, o.reps(3), warmup=1)
    finally:
        client.close()
        cluster.close()
        pool.terminate()
        pool.join()
        ex.close()
    # The first stage alone, without the parsing: the arrays' trip back to the driver.
    rows = int(size * 1024 * 1024 / BYTES_PER_ROW / files)
    items = [(i, rows) for i in range(files)]
    ex = ProcessExecutor(max_workers=n, reuse=False).warm()
    tflow: Workflow[str] = Workflow(start="make", executor=ex, name="etl-transport")
    tflow.register("make", MakeTables()).add_exit_state("done")
    pool = multiprocessing.get_context(MP_CONTEXT).Pool(n)
    try:
        tt = measure(
            {
                "cano": lambda: transport_cano(tflow, items),
                "pool": lambda: transport_pool(pool, items),
            },
            o.reps(3),
            warmup=1,
        )
    finally:
        pool.terminate()
        pool.join()
        ex.close()
    same = len(set(outs.values())) == 1
    row("outputs byte-identical across engines", "yes" if same else "NO", str(outs))
    assert same, outs
    for name, label in (
        ("cano", "cano_mp: BatchTask (results via shm) + 3-branch split"),
        ("pool", "multiprocessing.Pool: map + 3 apply_async"),
        ("joblib", f"joblib Parallel(n_jobs={n}) twice (memmapping)"),
        ("dask", "Dask LocalCluster (processes): map/gather + scatter/submit"),
    ):
        row(label, fmt_time(t[name]))
    r = t["cano"] / t["pool"]
    ratio("cano / multiprocessing.Pool", r, "≤ 0.85x", r <= 0.85)
    ratio("cano / joblib", t["cano"] / t["joblib"])
    ratio("cano / Dask", t["cano"] / t["dask"])
    mb = rows * files * 32 / 1024 / 1024
    row(f"stage 1 without parsing ({mb:.0f} MB of arrays back): cano_mp", fmt_time(tt["cano"]))
    row("stage 1 without parsing: multiprocessing.Pool map + concatenate", fmt_time(tt["pool"]))
    ratio("cano / multiprocessing.Pool, arrays' trip only", tt["cano"] / tt["pool"])


if __name__ == "__main__":
    import argparse

    import loky
    from bench import Opts

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=None, help="total CSV size (default 60)")
    p.add_argument("--files", type=int, default=None, help="number of files (default 240)")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--workers", type=int, default=None)
    args = p.parse_args()
    o = Opts(args.repeat, args.workers or max(1, int(loky.cpu_count())), False)
    case_etl(o, args.mb, args.files)
