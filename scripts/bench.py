"""Benchmarks: cano_mp beside its peers, measured in the same run.

    python scripts/bench.py                   # the core group
    python scripts/bench.py split             # the split group
    python scripts/bench.py chain fanout      # single cases
    python scripts/bench.py all --repeat 9    # everything, 9 timed repetitions each

Groups and cases:

    core    chain     per-state cost of a 200-state workflow vs loky, Pool, a raw pipe
            inline    transitions/s with executor="inline" vs python-statemachine, transitions
            bigdata   a 200 MB array through the store vs pickling, joblib, hand-written shm
            startup   `import cano_mp` and `cano-mp run` vs `python -c pass`, a first loky call;
                      first result: default, --warm, --fork-server, preload vs fork-based pools
    split   fanout    one split of 1,000 trivial branches vs loky, ProcessPoolExecutor, Pool
            fanout_distinct  the same with 1,000 distinct task objects ([Leaf(i) ...])
            scaling   N CPU-bound branches: speedup over sequential, vs loky, ProcessPool...
            cancel    JoinStrategy.any(): from the first success to orchestrate() returning
    concurrent instances 1,000 instances of a 3-state workflow vs loky chained in 8 threads
            fairness  a slow workflow's time beside 1,000 quick instances vs alone
    observe chain+inline with a MetricsObserver, and with INFO logging, vs without
    dask    dask      fanout and batch tiny on a 2-worker LocalCluster vs client.map (extra dask)
    arrays  arrayread a task sums a 200 MB array: first and second read vs in-process, fresh mmap
            etl       240 CSV files parsed in a BatchTask, 3 aggregations: vs Pool, joblib, Dask
    scheduler lateness 100 ticks of a 50 ms interval flow vs a bare Event.wait loop
            idle      100 flows on 60 s intervals: CPU used over 10 s
            drift     1,000 ticks at 20 ms: lateness of the last tick vs the first
    batch   tiny      100,000 items of x * 2 vs joblib, ProcessPoolExecutor.map, Pool.map
            medium    2,000 items of ~5 ms CPU: speedup over sequential, vs joblib
            memory    a generator of 5,000,000 items: the driver's peak RSS
    checkpoint checkpoint chain with checkpoints on vs off; a 200 MB array's checkpoint vs
                       np.save (and with fsync); bytes written for a state that left it alone

Each number is the median of several timed repetitions, taken after untimed warm-up runs
on pools started beforehand. The contenders of a comparison run interleaved (one
repetition of each in turn), so that load from elsewhere on the machine hits them alike.
The script prints, never asserts: the goals beside the ratios say what we aim for.
Timings are noisy on small or shared machines; rerun a case before believing a surprise.

Every task and peer function below is defined in this file, which runs as ``__main__``:
they all travel to the workers by value (cloudpickle), as a script's functions do.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loky

from cano_mp import (
    BatchTask,
    ConcurrentWorkflow,
    FunctionTask,
    JoinConfig,
    JoinStrategy,
    MetricsObserver,
    ProcessExecutor,
    RateLimiter,
    Scheduler,
    SharedStore,
    Task,
    TaskConfig,
    Workflow,
    task_context,
)
from cano_mp._executors import shutdown_shared_pools

ROOT = Path(__file__).resolve().parent.parent
MB = 1024 * 1024
SHM_ROOT = "/dev/shm"

# multiprocessing.Pool and ProcessPoolExecutor use forkserver: this process runs threads
# (the cano_mp and loky pool managers), and fork() with threads can deadlock a child.
MP_CONTEXT = "forkserver"
NO_RETRY = TaskConfig.minimal()


# ----------------------------------------------------------------------------------------
# Task and peer functions (module level, hence __main__ functions)
# ----------------------------------------------------------------------------------------


def chain_step(store: Any) -> int:
    """One state of an integer chain: go to the next integer."""
    state = task_context().state
    assert isinstance(state, int)
    return state + 1


def trivial(i: int) -> int:
    """The peers' trivial call."""
    return i + 1


def echo(conn: Any) -> None:
    """The pipe floor's worker: send back what comes, until None."""
    while (x := conn.recv()) is not None:
        conn.send(x)


@contextmanager
def pipe_worker() -> Iterator[Any]:
    """A worker process at the end of a duplex pipe, echoing (the floor of any pool)."""
    ctx = multiprocessing.get_context(MP_CONTEXT)
    here, there = ctx.Pipe(duplex=True)
    proc = ctx.Process(target=echo, args=(there,), daemon=True)
    proc.start()
    there.close()
    try:
        yield here
    finally:
        here.send(None)
        proc.join(5)
        if proc.is_alive():
            proc.kill()
        here.close()


def ping_pong(conn: Any, n: int) -> Callable[[], None]:
    """``n`` round trips of a small message over ``conn``."""

    def run() -> None:
        send, recv = conn.send, conn.recv
        for i in range(n):
            send(("call", i))
            recv()

    return run


def leaf(store: Any) -> str:
    """A trivial split branch."""
    return "done"


def burn(n: int) -> int:
    """Pure-Python CPU work (holds the GIL all along)."""
    s = 0
    for i in range(n):
        s += i ^ (i >> 3)
    return s


def burn_task(store: Any) -> str:
    burn(store["iters"])
    return "done"


def sum_head(x: Any) -> float:
    """What every bigdata contender computes: a fixed slice, so the size does not matter."""
    return float(x[:1000].sum())


def read_task(store: Any) -> str:
    store["sum"] = sum_head(store["x"])
    return "done"


def shm_sum(name: str, n: int) -> float:
    """Hand-written shared memory: attach by name, wrap in an ndarray, sum the slice."""
    from multiprocessing import shared_memory

    import numpy as np

    # Python < 3.13 registers an attached segment with the resource tracker too; loky
    # workers share the driver's tracker, so that is a no-op and the driver's unlink()
    # unregisters it (unregistering here as well would make the tracker fail).
    shm = shared_memory.SharedMemory(name=name)
    try:
        x = np.ndarray((n,), dtype=np.float64, buffer=shm.buf)
        s = sum_head(x)
        del x
    finally:
        shm.close()
    return s


def winner(store: Any) -> str:
    time.sleep(0.05)
    store["t_done"] = time.time()
    return "done"


def spinner(store: Any) -> str:
    end = time.perf_counter() + 60.0
    while time.perf_counter() < end:
        pass
    return "done"


# ----------------------------------------------------------------------------------------
# Measuring and printing
# ----------------------------------------------------------------------------------------


@dataclass
class Opts:
    repeat: int | None
    workers: int
    quick: bool

    def reps(self, default: int) -> int:
        return self.repeat if self.repeat is not None else default


@dataclass
class Timed:
    """``fn()`` timed; ``setup()`` and ``teardown()`` run around it, untimed."""

    fn: Callable[[], Any]
    setup: Callable[[], Any] | None = None
    teardown: Callable[[], Any] | None = None

    def once(self) -> float:
        if self.setup is not None:
            self.setup()
        # No gc.collect() here: measured to add ~0.2 ms to the run right after it (cold
        # caches, most likely), which swamps the sub-millisecond contenders.
        t0 = time.perf_counter()
        self.fn()
        dt = time.perf_counter() - t0
        if self.teardown is not None:
            self.teardown()
        return dt


def measure(
    contenders: dict[str, Callable[[], Any] | Timed], repeat: int, warmup: int = 1
) -> dict[str, float]:
    """Median seconds of each contender over ``repeat`` runs, after ``warmup`` runs.

    Runs are interleaved: one of each contender in turn, ``warmup + repeat`` rounds, each
    round starting one contender further (so that none always runs after the same one).
    """
    items = [(k, v if isinstance(v, Timed) else Timed(v)) for k, v in contenders.items()]
    times: dict[str, list[float]] = {k: [] for k, _ in items}
    for i in range(warmup + repeat):
        shift = i % len(items)
        for key, item in items[shift:] + items[:shift]:
            dt = item.once()
            if i >= warmup:
                times[key].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_time(seconds: float) -> str:
    sign, seconds = ("-", -seconds) if seconds < 0 else ("", seconds)
    if seconds < 1e-6:
        text = f"{sign}{seconds * 1e9:.0f} ns"
    elif seconds < 1e-3:
        text = f"{sign}{seconds * 1e6:.1f} µs"
    elif seconds < 1.0:
        text = f"{sign}{seconds * 1e3:.2f} ms"
    else:
        text = f"{sign}{seconds:.3f} s "
    return f"{text:>11}"


def header(title: str, detail: str = "") -> None:
    print(f"\n== {title}" + (f": {detail}" if detail else ""), flush=True)


def row(label: str, value: str, note: str = "") -> None:
    print(f"  {label:<56} {value}" + (f"   {note}" if note else ""), flush=True)


def met(ok: bool) -> str:
    return "met" if ok else "MISSED"


def ratio(label: str, value: float, goal: str | None = None, ok: bool = False) -> None:
    row(label, f"{value:10.2f}x", f"(goal {goal}: {met(ok)})" if goal is not None else "")


def loky_executor(n: int) -> Any:
    # A long idle timeout: workers must not retire between the warm-up and the timing.
    return loky.get_reusable_executor(max_workers=n, timeout=300)


def cano_executor(n: int) -> ProcessExecutor:
    return ProcessExecutor(max_workers=n).warm()


@contextmanager
def mp_pool(n: int) -> Iterator[Any]:
    pool = multiprocessing.get_context(MP_CONTEXT).Pool(n)
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


@contextmanager
def process_pool(n: int) -> Iterator[ProcessPoolExecutor]:
    pool = ProcessPoolExecutor(n, mp_context=multiprocessing.get_context(MP_CONTEXT))
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def burst(submit: Callable[[int], Any], get: Callable[[Any], Any], n: int) -> Callable[[], None]:
    """Submit ``n`` calls, then wait for them all."""

    def run() -> None:
        handles = [submit(i) for i in range(n)]
        for h in handles:
            get(h)

    return run


def round_trips(
    submit: Callable[[int], Any], get: Callable[[Any], Any], n: int
) -> Callable[[], None]:
    """``n`` calls one after the other, each waited for before the next."""

    def run() -> None:
        for i in range(n):
            get(submit(i))

    return run


# ----------------------------------------------------------------------------------------
# core: chain
# ----------------------------------------------------------------------------------------

CHAIN = 200


def case_chain(o: Opts) -> None:
    n = o.workers
    header(
        "chain",
        f"{CHAIN}-state workflow, a trivial __main__ task per state, {n} workers, "
        "vs sequential round trips",
    )
    flow: Workflow[int] = Workflow(start=0, executor=cano_executor(n), name="chain")
    for s in range(CHAIN):
        flow.register(s, chain_step)
    flow.add_exit_state(CHAIN)
    ex = loky_executor(n)
    with SharedStore() as store, mp_pool(n) as pool, pipe_worker() as conn:

        def run_cano() -> None:
            assert flow.orchestrate(store=store) == CHAIN

        def fut_get(f: Any) -> Any:
            return f.result()

        def res_get(r: Any) -> Any:
            return r.get()

        def loky_submit(i: int) -> Any:
            return ex.submit(trivial, i)

        def pool_submit(i: int) -> Any:
            return pool.apply_async(trivial, (i,))

        burst(loky_submit, fut_get, 4 * n)()  # start the pools' workers
        burst(pool_submit, res_get, 4 * n)()
        t = measure(
            {
                "cano": run_cano,
                "loky": round_trips(loky_submit, fut_get, CHAIN),
                "mp": round_trips(pool_submit, res_get, CHAIN),
                "pipe": ping_pong(conn, CHAIN),
            },
            o.reps(7),
            warmup=3,
        )
    cano, lk, mp = t["cano"] / CHAIN, t["loky"] / CHAIN, t["mp"] / CHAIN
    pipe = t["pipe"] / CHAIN
    row("cano_mp orchestrate(), per transition", fmt_time(cano))
    row("loky submit(f).result(), per call", fmt_time(lk))
    row(f"multiprocessing.Pool ({MP_CONTEXT}) apply_async().get()", fmt_time(mp))
    row("pipe ping-pong with a worker process (the floor)", fmt_time(pipe))
    ratio("cano / loky", cano / lk, "≤ 1.20x", cano / lk <= 1.2)
    ratio("cano / multiprocessing.Pool", cano / mp)
    ratio("cano / pipe floor", cano / pipe, "≤ 2.50x", cano / pipe <= 2.5)


# ----------------------------------------------------------------------------------------
# core: inline
# ----------------------------------------------------------------------------------------

INLINE_STATES = 1000
INLINE_RUNS = 10
TRANSITIONS = INLINE_STATES * INLINE_RUNS


def case_inline(o: Opts) -> None:
    from statemachine import State, StateMachine
    from transitions import Machine

    header(
        "inline",
        f"{TRANSITIONS:,} transitions in the driver (executor='inline') vs pure FSM libraries",
    )
    chain: Workflow[int] = Workflow(start=0, executor="inline", name="inline-chain")
    for s in range(INLINE_STATES):
        chain.register(s, chain_step)
    chain.add_exit_state(INLINE_STATES)

    counter = [0]

    def tick(store: Any) -> str:
        counter[0] += 1
        if counter[0] >= TRANSITIONS:
            return "done"
        return "b" if counter[0] % 2 else "a"

    cycle: Workflow[str] = Workflow(start="a", executor="inline", name="inline-cycle")
    cycle.register("a", tick).register("b", tick).add_exit_state("done")

    class Cycle(StateMachine):
        a = State(initial=True)
        b = State()
        go = a.to(b) | b.to(a)

    def run_psm() -> None:
        sm = Cycle()
        send = sm.send
        for _ in range(TRANSITIONS):
            send("go")

    def run_tr() -> None:
        m = Machine(
            states=["a", "b"],
            transitions=[["go", "a", "b"], ["go", "b", "a"]],
            initial="a",
            auto_transitions=False,
        )
        go = m.go
        for _ in range(TRANSITIONS):
            go()

    with SharedStore() as store:

        def run_chain() -> None:
            for _ in range(INLINE_RUNS):
                chain.orchestrate(store=store)

        def run_cycle() -> None:
            counter[0] = 0
            assert cycle.orchestrate(store=store) == "done"

        t = measure(
            {"chain": run_chain, "cycle": run_cycle, "psm": run_psm, "tr": run_tr},
            o.reps(5),
            warmup=1,
        )
    rate = {k: TRANSITIONS / v for k, v in t.items()}
    row(
        f"cano_mp {INLINE_STATES}-state chain x {INLINE_RUNS} runs",
        f"{rate['chain']:11,.0f} transitions/s",
    )
    row("cano_mp 2-state cycle a<->b (closure counter)", f"{rate['cycle']:11,.0f} transitions/s")
    row("python-statemachine 2-state cycle, send('go')", f"{rate['psm']:11,.0f} transitions/s")
    row("transitions Machine 2-state cycle, go()", f"{rate['tr']:11,.0f} transitions/s")
    for key in ("chain", "cycle"):
        r1, r2 = rate[key] / rate["psm"], rate[key] / rate["tr"]
        ratio(f"cano {key} / python-statemachine (speed)", r1, "> 1x", r1 > 1)
        ratio(f"cano {key} / transitions (speed)", r2, "> 1x", r2 > 1)


# ----------------------------------------------------------------------------------------
# core: bigdata
# ----------------------------------------------------------------------------------------


def _segment_put(arr: Any) -> Any:
    """A SharedMemory segment created and filled by hand."""
    from multiprocessing import shared_memory

    import numpy as np

    shm = shared_memory.SharedMemory(create=True, size=arr.nbytes)
    view = np.ndarray(arr.shape, dtype=arr.dtype, buffer=shm.buf)
    view[:] = arr
    del view
    return shm


def _segment_free(shm: Any) -> None:
    shm.close()
    shm.unlink()


def case_bigdata(o: Opts) -> None:
    import numpy as np
    from joblib import Parallel, delayed

    n = o.workers
    big_mb, small_mb = 200, 20
    header(
        "bigdata",
        f"a {big_mb} MB float64 array to a worker that sums a fixed 1,000-element slice",
    )
    big = np.arange(big_mb * MB // 8, dtype=np.float64)
    small = np.arange(small_mb * MB // 8, dtype=np.float64)
    expected = sum_head(big)

    # -- putting the array into shared memory ------------------------------------------
    held: list[Any] = []
    put = Timed(
        lambda: held[0].put("x", big),
        setup=lambda: held.append(SharedStore()),
        teardown=lambda: held.pop().close(),
    )
    seg = Timed(
        lambda: held.append(_segment_put(big)),
        teardown=lambda: _segment_free(held.pop()),
    )
    t = measure({"put": put, "seg": seg}, o.reps(5), warmup=1)

    # -- reading it in a worker -----------------------------------------------------------
    flow: Workflow[str] = Workflow(start="read", executor=cano_executor(n), name="bigdata")
    flow.register("read", FunctionTask(read_task, config=NO_RETRY)).add_exit_state("done")
    ex = loky_executor(n)
    burst(lambda i: ex.submit(trivial, i), lambda f: f.result(), 4 * n)()
    shm = _segment_put(big)
    try:
        with SharedStore() as s_big, SharedStore() as s_small:
            s_big["x"] = big
            s_small["x"] = small

            def read(store: SharedStore) -> None:
                flow.orchestrate(store=store)
                assert store["sum"] == expected

            def hand() -> None:
                assert ex.submit(shm_sum, shm.name, big.size).result() == expected

            t.update(
                measure(
                    {
                        "cano": lambda: read(s_big),
                        "cano_small": lambda: read(s_small),
                        "hand": hand,
                    },
                    o.reps(15),
                    warmup=3,
                )
            )
    finally:
        _segment_free(shm)

    def pickled() -> None:
        assert ex.submit(sum_head, big).result() == expected

    def joblib_run() -> None:
        out = Parallel(n_jobs=n)(delayed(sum_head)(big) for _ in range(1))
        assert out == [expected]

    t.update(measure({"pickle": pickled, "joblib": joblib_run}, o.reps(3), warmup=1))

    row(f"cano_mp store.put('x', {big_mb} MB array)", fmt_time(t["put"]))
    row("SharedMemory(create=True) + fill, by hand", fmt_time(t["seg"]))
    ratio("put / create+fill", t["put"] / t["seg"], "≤ 1.20x", t["put"] / t["seg"] <= 1.2)
    row(f"cano_mp orchestrate(): a task reads store['x'] ({big_mb} MB)", fmt_time(t["cano"]))
    row(
        f"cano_mp orchestrate(): a task reads store['x'] ({small_mb} MB)", fmt_time(t["cano_small"])
    )
    row(
        f"  {big_mb} MB read / {small_mb} MB read",
        f"{t['cano'] / t['cano_small']:10.2f}x",
        "(≈ 1x: the read does not grow with the size)",
    )
    row("loky submit(f, array): pickled through the pipe", fmt_time(t["pickle"]))
    row(f"joblib Parallel(n_jobs={n}): automatic memmapping", fmt_time(t["joblib"]))
    row("hand-written SharedMemory + loky, attach by name", fmt_time(t["hand"]))
    r_pickle, r_joblib = t["pickle"] / t["cano"], t["joblib"] / t["cano"]
    r_hand = t["cano"] / t["hand"]
    ratio("loky pickling / cano (speedup)", r_pickle, "≥ 30x", r_pickle >= 30)
    ratio("joblib / cano (speedup)", r_joblib, "≥ 10x", r_joblib >= 10)
    ratio("cano / hand-written shm", r_hand, "≤ 1.20x", r_hand <= 1.2)


# ----------------------------------------------------------------------------------------
# core: startup
# ----------------------------------------------------------------------------------------

STARTUP_FLOW = """\
import sys
import time

from cano_mp import Observer, ProcessExecutor, Workflow


class FirstResult(Observer):
    # From orchestrate() to the first task's result, on stderr.
    def on_workflow_start(self, run):
        self.t0 = time.perf_counter()

    def on_task_end(self, run, state, task_name, attempt, *, error, duration):
        print(f"first-result {time.perf_counter() - self.t0:.6f}", file=sys.stderr)


def work(store):
    return "done"


executor = None
if "--preload" in sys.argv:  # a script on an exec'd fork server that preloads numpy
    executor = ProcessExecutor(start_method="forkserver", preload=["numpy"])
flow = Workflow(start="work", name="startup", executor=executor, observers=[FirstResult()])
flow.register("work", work).add_exit_state("done")
if __name__ == "__main__":
    if "--warmed" in sys.argv:  # a script that warms the pool before it runs
        flow.executor.warm()
    print(flow.orchestrate())
"""

STARTUP_LOKY = """\
import loky


def work():
    return "done"


if __name__ == "__main__":
    print(loky.get_reusable_executor().submit(work).result())
"""

STARTUP_FORK_PEER = """\
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor


def work():
    return "done"


if __name__ == "__main__":
    ctx = multiprocessing.get_context("fork")
    t0 = time.perf_counter()
    if sys.argv[1] == "pool":
        with ctx.Pool() as pool:
            result = pool.apply_async(work).get()
            print(f"first-result {time.perf_counter() - t0:.6f}", file=sys.stderr)
    else:
        with ProcessPoolExecutor(mp_context=ctx) as ex:
            result = ex.submit(work).result()
            print(f"first-result {time.perf_counter() - t0:.6f}", file=sys.stderr)
    print(result)
"""


def _wall(cmd: list[str], env: dict[str, str], cwd: str, expect: str | None) -> float:
    return _run_timed(cmd, env, cwd, expect)[0]


def _run_timed(
    cmd: list[str], env: dict[str, str], cwd: str, expect: str | None
) -> tuple[float, float]:
    """``(wall time, first result)`` of a command; first result as it prints it (else nan)."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if done.returncode != 0 or (expect is not None and done.stdout.strip() != expect):
        raise RuntimeError(
            f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        )
    marks = [ln.split()[1] for ln in done.stderr.splitlines() if ln.startswith("first-result ")]
    return dt, float(marks[0]) if marks else float("nan")


def case_startup(o: Opts) -> None:
    header("startup", "wall time of fresh interpreters (subprocess)")
    py = sys.executable
    cli = Path(py).parent / "cano-mp"
    cano_cli = [str(cli)] if cli.exists() else [py, "-m", "cano_mp"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    tmp = tempfile.mkdtemp(prefix="cano-bench-")
    try:
        flow_py = Path(tmp, "oneflow.py")
        flow_py.write_text(STARTUP_FLOW)
        loky_py = Path(tmp, "firstloky.py")
        loky_py.write_text(STARTUP_LOKY)
        peer_py = Path(tmp, "forkpeer.py")
        peer_py.write_text(STARTUP_FORK_PEER)
        run = [*cano_cli, "run", f"{flow_py}:flow"]
        commands = {
            "pass": ([py, "-c", "pass"], None),
            "import": ([py, "-c", "import cano_mp"], None),
            "loky": ([py, str(loky_py)], "done"),
            "cli": (run, "done"),
            "cli --warm": ([*run, "--warm"], "done"),
            "cli --fork-server": ([*run, "--fork-server"], "done"),
            "cli --fork-server --warm": ([*run, "--fork-server", "--warm"], "done"),
            "script, warm() first": ([py, str(flow_py), "--warmed"], "done"),
            "script, forkserver + preload": ([py, str(flow_py), "--preload"], "done"),
            "mp.Pool (fork)": ([py, str(peer_py), "pool"], "done"),
            "ProcessPoolExecutor (fork)": ([py, str(peer_py), "ppe"], "done"),
        }
        t = _measure_runs(commands, env, tmp, o.reps(5))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = {k: v[0] for k, v in t.items()}
    imp = wall["import"] - wall["pass"]
    extra = wall["cli"] - wall["loky"]
    row('python -c "pass"', fmt_time(wall["pass"]))
    row('python -c "import cano_mp"', fmt_time(wall["import"]))
    row("  import cost (the difference)", fmt_time(imp), f"(goal ≤ 100 ms: {met(imp <= 0.1)})")
    row("bare script: a first loky submit(f).result()", fmt_time(wall["loky"]))
    row("cano-mp run tmp.py:flow (one pool task)", fmt_time(wall["cli"]))
    row("  cano-mp run - bare loky", fmt_time(extra), f"(goal ≤ +50 ms: {met(extra <= 0.05)})")
    _startup_first_results(t)


def _measure_runs(
    commands: dict[str, tuple[list[str], str | None]], env: dict[str, str], cwd: str, reps: int
) -> dict[str, tuple[float, float]]:
    """Median ``(wall, first result)`` of each command, interleaved, after one warm-up."""
    items = list(commands.items())
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in commands}
    for i in range(1 + reps):
        shift = i % len(items)
        for key, (cmd, expect) in items[shift:] + items[:shift]:
            timed = _run_timed(cmd, env, cwd, expect)
            if i:
                runs[key].append(timed)
    return {
        k: (statistics.median(w for w, _ in v), statistics.median(f for _, f in v))
        for k, v in runs.items()
    }


def _startup_first_results(t: dict[str, tuple[float, float]]) -> None:
    print("  first result: from orchestrate() (the pool's creation for the peers)", flush=True)
    peer = min(t["mp.Pool (fork)"][1], t["ProcessPoolExecutor (fork)"][1])
    for key in ("mp.Pool (fork)", "ProcessPoolExecutor (fork)"):
        row(f"  {key}", fmt_time(t[key][1]), f"wall {fmt_time(t[key][0]).strip()}")
    for key, label, goal in (
        ("cli", "cano-mp run (default: fresh interpreters)", False),
        ("cli --warm", "cano-mp run --warm", False),
        ("cli --fork-server", "cano-mp run --fork-server", True),
        ("cli --fork-server --warm", "cano-mp run --fork-server --warm", False),
        ("script, warm() first", "script: executor.warm(), then orchestrate()", False),
        ("script, forkserver + preload", "script: forkserver, preload numpy", False),
    ):
        first, wall = t[key][1], t[key][0]
        note = f"wall {fmt_time(wall).strip()}, {first / peer:.2f}x the best fork peer"
        if goal:
            note += f" (goal ≤ 2x: {met(first <= 2 * peer)})"
        row(f"  {label}", fmt_time(first), note)


# ----------------------------------------------------------------------------------------
# split: fanout
# ----------------------------------------------------------------------------------------

FANOUT = 1000


def case_fanout(o: Opts) -> None:
    n = o.workers
    header("fanout", f"one split of {FANOUT:,} trivial branches, JoinStrategy.all(), {n} workers")
    flow: Workflow[str] = Workflow(start="split", executor=cano_executor(n), name="fanout")
    flow.register_split("split", [leaf] * FANOUT, JoinConfig(JoinStrategy.all(), "done"))
    flow.add_exit_state("done")
    ex = loky_executor(n)
    with SharedStore() as store, process_pool(n) as ppe, mp_pool(n) as pool:

        def run_cano() -> None:
            assert flow.orchestrate(store=store) == "done"

        def fut_get(f: Any) -> Any:
            return f.result()

        t = measure(
            {
                "cano": run_cano,
                "loky": burst(lambda i: ex.submit(trivial, i), fut_get, FANOUT),
                "ppe": burst(lambda i: ppe.submit(trivial, i), fut_get, FANOUT),
                "mp": burst(lambda i: pool.apply_async(trivial, (i,)), lambda r: r.get(), FANOUT),
            },
            o.reps(5),
            warmup=2,
        )
    cano, lk, pp, mp = (t[k] / FANOUT for k in ("cano", "loky", "ppe", "mp"))
    row("cano_mp split, per branch", fmt_time(cano))
    row("loky submit all, then gather, per call", fmt_time(lk))
    row(f"ProcessPoolExecutor ({MP_CONTEXT}) submit/gather", fmt_time(pp))
    row(f"multiprocessing.Pool ({MP_CONTEXT}) apply_async/get", fmt_time(mp))
    ratio("cano / loky", cano / lk, "≤ 1.30x", cano / lk <= 1.3)
    ratio("cano / ProcessPoolExecutor", cano / pp)
    ratio("cano / multiprocessing.Pool", cano / mp, "< 1x, moonshot", cano / mp < 1)


class Leaf(Task[str]):
    """A trivial split branch with state of its own: a split of ``[Leaf(i) for i in ...]``
    is 1,000 distinct task objects (the common shape), not one object 1,000 times."""

    def __init__(self, i: int) -> None:
        self.i = i

    def run(self, store: Any) -> str:
        return "done"


def case_fanout_distinct(o: Opts) -> None:
    n = o.workers
    header("fanout_distinct", f"one split of {FANOUT:,} distinct task objects, {n} workers")
    flow: Workflow[str] = Workflow(start="split", executor=cano_executor(n), name="distinct")
    branches = [Leaf(i) for i in range(FANOUT)]
    flow.register_split("split", branches, JoinConfig(JoinStrategy.all(), "done"))
    flow.add_exit_state("done")
    ex = loky_executor(n)
    with SharedStore() as store, process_pool(n) as ppe, mp_pool(n) as pool:

        def run_cano() -> None:
            assert flow.orchestrate(store=store) == "done"

        def fut_get(f: Any) -> Any:
            return f.result()

        # The peers get distinct objects too: each call carries its own Leaf ("loky" also
        # submits a plain function, as in `fanout`: the floor the goal is measured against).
        t = measure(
            {
                "cano": run_cano,
                "loky": burst(lambda i: ex.submit(trivial, i), fut_get, FANOUT),
                "lokyobj": burst(lambda i: ex.submit(branches[i].run, None), fut_get, FANOUT),
                "ppe": burst(lambda i: ppe.submit(branches[i].run, None), fut_get, FANOUT),
                "mp": burst(
                    lambda i: pool.apply_async(branches[i].run, (None,)), lambda r: r.get(), FANOUT
                ),
            },
            o.reps(5),
            warmup=2,
        )
    cano, lk, lo, pp, mp = (t[k] / FANOUT for k in ("cano", "loky", "lokyobj", "ppe", "mp"))
    row("cano_mp split of distinct tasks, per branch", fmt_time(cano))
    row("loky submit(trivial, i) all, then gather, per call", fmt_time(lk))
    row("loky submit(task.run) all, then gather, per call", fmt_time(lo))
    row(f"ProcessPoolExecutor ({MP_CONTEXT}) submit/gather", fmt_time(pp))
    row(f"multiprocessing.Pool ({MP_CONTEXT}) apply_async/get", fmt_time(mp))
    ratio("cano / loky (trivial function)", cano / lk, "≤ 0.80x", cano / lk <= 0.8)
    ratio("cano / loky (the same task objects)", cano / lo)
    ratio("cano / ProcessPoolExecutor", cano / pp)
    ratio("cano / multiprocessing.Pool", cano / mp, "< 1x, moonshot", cano / mp < 1)


# ----------------------------------------------------------------------------------------
# split: scaling
# ----------------------------------------------------------------------------------------


def _calibrate(seconds: float) -> int:
    """Loop turns of ``burn`` that take about ``seconds`` here."""
    n = 200_000
    while True:
        t0 = time.perf_counter()
        burn(n)
        dt = time.perf_counter() - t0
        if dt >= 0.1:
            return max(1, int(n * seconds / dt))
        n *= 2


def case_scaling(o: Opts) -> None:
    n = o.workers
    target = 0.3 if o.quick else 1.0
    iters = _calibrate(target)
    header(
        "scaling",
        f"{n} branches of ~{target:g} s of pure-Python CPU ({iters:,} loop turns), {n} workers",
    )
    flow: Workflow[str] = Workflow(start="split", executor=cano_executor(n), name="scaling")
    flow.register_split(
        "split",
        [FunctionTask(burn_task, config=NO_RETRY) for _ in range(n)],
        JoinConfig(JoinStrategy.all(), "done"),
    )
    flow.add_exit_state("done")
    ex = loky_executor(n)

    def fut_get(f: Any) -> Any:
        return f.result()

    with SharedStore() as store, SharedStore() as tiny, process_pool(n) as ppe:
        store["iters"] = iters
        tiny["iters"] = 1000
        flow.orchestrate(store=tiny)  # start the workers, load the tasks
        burst(lambda i: ex.submit(burn, 1000), fut_get, 4 * n)()
        burst(lambda i: ppe.submit(burn, 1000), fut_get, 4 * n)()
        t = measure(
            {
                "seq": lambda: [burn(iters) for _ in range(n)],
                "cano": lambda: flow.orchestrate(store=store),
                "loky": burst(lambda i: ex.submit(burn, iters), fut_get, n),
                "ppe": burst(lambda i: ppe.submit(burn, iters), fut_get, n),
            },
            o.reps(3),
            warmup=0,
        )
    speed = {k: t["seq"] / t[k] for k in ("cano", "loky", "ppe")}
    best = max(speed["loky"], speed["ppe"])
    row(f"sequential, in the driver ({n} x burn)", fmt_time(t["seq"]))
    row("cano_mp split", fmt_time(t["cano"]), f"speedup {speed['cano']:.2f}x")
    row("loky submit/gather", fmt_time(t["loky"]), f"speedup {speed['loky']:.2f}x")
    row(f"ProcessPoolExecutor ({MP_CONTEXT})", fmt_time(t["ppe"]), f"speedup {speed['ppe']:.2f}x")
    goal = 1.8 if n == 2 else 0.9 * n
    ratio("cano speedup", speed["cano"], f"≥ {goal:.2f}x", speed["cano"] >= goal)
    r_best = speed["cano"] / best
    ratio("cano speedup / best peer's", r_best, "≥ 0.95x", r_best >= 0.95)


# ----------------------------------------------------------------------------------------
# split: cancel
# ----------------------------------------------------------------------------------------


def case_cancel(o: Opts) -> None:
    n = max(2, o.workers)
    header(
        "cancel",
        "JoinStrategy.any(): branch 0 returns after 50 ms, branch 1 spins for 60 s in "
        "pure Python; from branch 0's return to orchestrate() returning",
    )
    ex = cano_executor(n)
    flow: Workflow[str] = Workflow(start="race", executor=ex, name="cancel")
    flow.register_split(
        "race",
        [FunctionTask(winner, config=NO_RETRY), FunctionTask(spinner, config=NO_RETRY)],
        JoinConfig(JoinStrategy.any(), "done"),
    )
    flow.add_exit_state("done")
    latencies, totals = [], []
    stuck = 0
    with SharedStore() as store:
        for i in range(o.reps(5) + 1):
            stuck += not _wait_for_idle_workers(ex, n)
            t0 = time.perf_counter()
            assert flow.orchestrate(store=store) == "done"
            t_end = time.time()
            total = time.perf_counter() - t0
            if i:  # the first run loads the tasks into the workers
                latencies.append(t_end - store["t_done"])
                totals.append(total)
    stuck += not _wait_for_idle_workers(ex, n)
    lat = statistics.median(latencies)
    row("orchestrate() total", fmt_time(statistics.median(totals)))
    row(
        "branch 0 returned -> orchestrate() returned",
        fmt_time(lat),
        f"(goal < 100 ms: {met(lat < 0.1)})",
    )
    row("  the slowest run", fmt_time(max(latencies)))
    if stuck:
        row("the spinning branch's worker was still busy 10 s later", f"{stuck:>10} times")


def _wait_for_idle_workers(ex: ProcessExecutor, n: int, timeout: float = 10.0) -> bool:
    """Wait until the pool has ``n`` live, idle workers (the killed spinner respawned)."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ex.warm()
        pids = ex.worker_pids()
        if len(pids) == n and all(_idle(psutil, p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _idle(psutil: Any, pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).cpu_percent(interval=0.05) < 50)
    except psutil.Error:
        return False


# ----------------------------------------------------------------------------------------
# concurrent: instances, fairness
# ----------------------------------------------------------------------------------------

INSTANCES = 1_000
THREADS = 8


def three_states(name: str, n_workers: int, task_fn: Callable[[Any], int]) -> Workflow[int]:
    flow: Workflow[int] = Workflow(start=0, executor=cano_executor(n_workers), name=name)
    for s in range(3):
        flow.register(s, FunctionTask(task_fn, config=NO_RETRY))
    return flow.add_exit_state(3)


def case_instances(o: Opts) -> None:
    import threading

    n = o.workers
    count = 200 if o.quick else INSTANCES
    header(
        "instances",
        f"{count:,} instances of a 3-state workflow of trivial pool tasks, "
        f"max_concurrency={THREADS}, {n} workers",
    )
    flow = three_states("instances", n, chain_step)
    cw = ConcurrentWorkflow(flow, max_concurrency=THREADS, progress=False)
    ex = loky_executor(n)

    def run_cano() -> None:
        with cw.execute(count) as result:
            assert result.completed == count

    def run_loky() -> None:
        todo = iter(range(count))
        lock = threading.Lock()

        def drive() -> None:
            while True:
                with lock:
                    if next(todo, None) is None:
                        return
                for i in range(3):
                    ex.submit(trivial, i).result()

        threads = [threading.Thread(target=drive) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    t = measure({"cano": run_cano, "loky": run_loky}, o.reps(3), warmup=1)
    row("cano_mp ConcurrentWorkflow, instances / s", f"{count / t['cano']:10,.0f}")
    row(
        f"loky, 3 chained round trips per instance in {THREADS} threads",
        f"{count / t['loky']:10,.0f}",
    )
    r = t["cano"] / t["loky"]
    ratio("cano time / loky time", r, "≤ 1.30x", r <= 1.3)


def slow_step(store: Any) -> int:
    burn(store["iters"])
    return int(task_context().state) + 1


def _run_quick(cw: ConcurrentWorkflow[int], times: list[float]) -> None:
    t0 = time.perf_counter()
    with cw.execute(INSTANCES) as r:
        assert r.completed == INSTANCES
    times.append(time.perf_counter() - t0)


def case_fairness(o: Opts) -> None:
    import threading

    n = o.workers
    iters = _calibrate(0.1)
    header(
        "fairness",
        f"10 instances of a 3-state workflow of ~0.1 s tasks, alone and beside "
        f"{INSTANCES:,} quick instances (max_concurrency={THREADS}), one pool of {n} workers",
    )
    slow = three_states("slow", n, slow_step)
    quick = three_states("quick", n, chain_step)
    slow_cw = ConcurrentWorkflow(slow, progress=False)
    quick_cw = ConcurrentWorkflow(quick, max_concurrency=THREADS, progress=False)
    stores = [SharedStore() for _ in range(10)]
    for s in stores:
        s["iters"] = iters

    def run_slow() -> float:
        t0 = time.perf_counter()
        result = slow_cw.execute(stores)
        assert result.completed == 10
        return time.perf_counter() - t0

    alone, shared, quick_times = [], [], []
    run_slow()  # warm-up
    for _ in range(o.reps(3)):
        alone.append(run_slow())
        th = threading.Thread(target=_run_quick, args=(quick_cw, quick_times))
        th.start()
        time.sleep(0.05)  # the quick instances fill the pool queue first
        shared.append(run_slow())
        th.join()
    for s in stores:
        s.close()
    a, b = statistics.median(alone), statistics.median(shared)
    row("slow workflow alone", fmt_time(a))
    row(f"slow workflow beside {INSTANCES:,} quick instances", fmt_time(b))
    row("the quick instances (in the same run)", fmt_time(statistics.median(quick_times)))
    ratio("beside / alone", b / a, "≤ 1.50x", b / a <= 1.5)


# ----------------------------------------------------------------------------------------
# observe: the cost of observers and logging
# ----------------------------------------------------------------------------------------


def _chain_flow(executor: Any, states: int, observers: list[Any], name: str) -> Workflow[int]:
    flow: Workflow[int] = Workflow(start=0, executor=executor, name=name, observers=observers)
    for s in range(states):
        flow.register(s, chain_step)
    return flow.add_exit_state(states)


def case_observe(o: Opts) -> None:
    import io
    import logging

    n = o.workers
    header(
        "observe",
        f"a {CHAIN}-state pool chain and a {INLINE_STATES}-state inline chain: no observer, a "
        "MetricsObserver, INFO logging (a formatter writing to memory)",
    )
    pool_ex = cano_executor(n)
    sink = logging.StreamHandler(io.StringIO())
    sink.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    results: dict[str, dict[str, float]] = {}
    for label, executor, states in (
        ("chain", pool_ex, CHAIN),
        ("inline", "inline", INLINE_STATES),
    ):
        plain = _chain_flow(executor, states, [], f"{label}-plain")
        metered = _chain_flow(executor, states, [MetricsObserver()], f"{label}-metrics")
        logged = _chain_flow(executor, states, [], f"{label}-logged")

        def with_logging(flow: Workflow[int] = logged, store: Any = None) -> None:
            root.addHandler(sink)
            old = root.level
            root.setLevel(logging.INFO)
            try:
                flow.orchestrate(store=store)
            finally:
                root.setLevel(old)
                root.removeHandler(sink)
                sink.stream.seek(0)
                sink.stream.truncate()

        with SharedStore() as store:
            t = measure(
                {
                    "plain": lambda f=plain: f.orchestrate(store=store),
                    "metrics": lambda f=metered: f.orchestrate(store=store),
                    "logging": lambda f=logged: with_logging(f, store),
                },
                o.reps(7),
                warmup=2,
            )
        results[label] = {k: v / states for k, v in t.items()}
    for label, t in results.items():
        row(f"{label}: per transition, no observer", fmt_time(t["plain"]))
        # issue 15: ≤ 10 % for metrics, ≤ 25 % for one INFO line per transition
        for k, what, goal in (("metrics", "MetricsObserver", 10), ("logging", "INFO logging", 25)):
            r = t[k] / t["plain"]
            row(f"{label}: per transition, {what}", fmt_time(t[k]),
                f"{(r - 1) * 100:+.1f}% (goal ≤ +{goal}%: {met(r <= 1 + goal / 100)})")  # fmt: skip


def _case_dask(o: Opts) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_dask import case_dask  # here, not at the top: it imports this module back

    case_dask(o)


def _case_from(module: str, name: str, o: Opts) -> None:
    import importlib

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # here, not at the top: these modules import this one back
    getattr(importlib.import_module(module), f"case_{name}")(o)


# ----------------------------------------------------------------------------------------
# scheduler: lateness, idle, drift
# ----------------------------------------------------------------------------------------


def _stamping_flow(stamps: list[float]) -> Workflow[str]:
    def stamp(store: Any) -> str:
        stamps.append(time.monotonic())
        return "done"

    flow: Workflow[str] = Workflow(start="go", executor="inline", name="tick")
    return flow.register("go", FunctionTask(stamp, config=NO_RETRY)).add_exit_state("done")


def _ticks(interval: float, n: int) -> list[float]:
    """Lateness of each of ``n`` runs of an interval flow against its grid."""
    stamps: list[float] = []
    sched = Scheduler()
    sched.every("tick", _stamping_flow(stamps), "go", interval)
    with sched:
        anchor = sched._flows["tick"].grid.anchor  # type: ignore[union-attr]
        while len(stamps) < n:
            time.sleep(interval)
    return [t - (anchor + round((t - anchor) / interval) * interval) for t in stamps[:n]]


def _bare_ticks(interval: float, n: int) -> list[float]:
    import threading

    ev = threading.Event()
    t0 = time.monotonic()
    late = []
    for k in range(n):
        due = t0 + k * interval
        ev.wait(max(0.0, due - time.monotonic()))
        late.append(time.monotonic() - due)
    return late


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def case_lateness(o: Opts) -> None:
    n = 40 if o.quick else 100
    header("lateness", f"{n} ticks of a 50 ms interval flow (inline trivial task)")
    cano = _ticks(0.05, n)
    bare = _bare_ticks(0.05, n)
    c50, c99, b50, b99 = _pct(cano, 0.5), _pct(cano, 0.99), _pct(bare, 0.5), _pct(bare, 0.99)
    row("cano_mp Scheduler: median / p99 lateness", f"{fmt_time(c50)} / {fmt_time(c99).strip()}")
    row(
        "bare Event.wait loop (the floor): median / p99",
        f"{fmt_time(b50)} / {fmt_time(b99).strip()}",
    )
    ok = c50 - b50 <= 1e-3
    row("median over the floor", fmt_time(c50 - b50), f"(goal ≤ 1 ms: {met(ok)})")
    row("p99", fmt_time(c99), f"(goal ≤ 5 ms: {met(c99 <= 5e-3)})")


def case_idle(o: Opts) -> None:
    import resource

    seconds = 3.0 if o.quick else 10.0
    header("idle", f"100 flows on 60 s intervals, after their first runs: CPU over {seconds:g} s")
    stamps: list[float] = []
    sched = Scheduler()
    for i in range(100):
        sched.every(f"f{i}", _stamping_flow(stamps), "go", 60.0)
    with sched:
        while len(stamps) < 100:
            time.sleep(0.05)
        time.sleep(0.5)
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        time.sleep(seconds)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    share = cpu / seconds
    row("CPU used by the whole process", fmt_time(cpu), f"{share * 100:.3f}% of one core")
    row("share of one core", f"{share * 100:9.3f}%", f"(goal < 0.1%: {met(share < 1e-3)})")


def case_drift(o: Opts) -> None:
    n = 200 if o.quick else 1000
    header("drift", f"{n} ticks at 20 ms")
    late = _ticks(0.02, n)
    first = statistics.median(late[:10])
    last = statistics.median(late[-10:])
    row("lateness, first 10 ticks (median)", fmt_time(first))
    row("lateness, last 10 ticks (median)", fmt_time(last))
    ok = last <= first + 5e-3
    row("last - first", fmt_time(last - first), f"(goal ≤ 5 ms: {met(ok)})")


# ----------------------------------------------------------------------------------------
# batch: tiny, medium, memory
# ----------------------------------------------------------------------------------------

TINY = 100_000
MEDIUM = 2_000


def double(x: int) -> int:
    """The tiny item: the contract's ``x * 2``."""
    return x * 2


class MapBatch(BatchTask[str, int, Any]):
    """``fn`` over ``range(store["n"])`` (or ``store["iters"]`` repeated for burn)."""

    next_states = ("done",)

    def __init__(self, fn: Callable[[int], Any], *, generator: bool = False) -> None:
        self.fn = fn
        self.generator = generator
        self.progress = False

    def load(self, store: Any) -> Any:
        n, arg = store["n"], store.get("arg")
        if self.generator:
            return (i for i in range(n))
        return range(n) if arg is None else [arg] * n

    def process(self, item: int) -> Any:
        return self.fn(item)

    def finish(self, store: Any, results: list[Any]) -> str:
        store["out"] = len(results)
        return "done"


class Double(MapBatch):
    """The tiny batch as a user writes it: ``process`` is ``x * 2`` itself."""

    def process(self, item: int) -> int:
        return item * 2


def _batch_flow(
    fn: Callable[[int], Any], n_workers: int, batch: MapBatch | None = None, **kw: Any
) -> Workflow[str]:
    flow: Workflow[str] = Workflow(start="map", executor=cano_executor(n_workers), name="batch")
    return flow.register("map", batch or MapBatch(fn, **kw)).add_exit_state("done")


def case_tiny(o: Opts) -> None:
    import joblib

    n = o.workers
    header("tiny", f"{TINY:,} items of x * 2, {n} workers")
    flow = _batch_flow(double, n, Double(double))
    chunk = -(-TINY // (4 * n))  # multiprocessing.Pool.map's own default
    with SharedStore() as store, process_pool(n) as ppe, mp_pool(n) as pool:
        store["n"] = TINY
        par = joblib.Parallel(n_jobs=n)

        def run_cano() -> None:
            assert flow.orchestrate(store=store) == "done"
            assert store["out"] == TINY

        t = measure(
            {
                "cano": run_cano,
                "joblib": lambda: par(joblib.delayed(double)(i) for i in range(TINY)),
                "ppe": lambda: list(ppe.map(double, range(TINY), chunksize=chunk)),
                "mp": lambda: pool.map(double, range(TINY)),
            },
            o.reps(5),
            warmup=2,
        )
    cano, jl, pp, mp = (t[k] / TINY for k in ("cano", "joblib", "ppe", "mp"))
    row("cano_mp BatchTask (auto chunks), per item", fmt_time(cano))
    row(f"joblib.Parallel(n_jobs={n}) (auto batching), per item", fmt_time(jl))
    row(f"ProcessPoolExecutor.map(chunksize={chunk:,}), per item", fmt_time(pp))
    row("multiprocessing.Pool.map (default chunks), per item", fmt_time(mp))
    ratio("cano / joblib", cano / jl, "< 1x", cano < jl)
    ratio("cano / ProcessPoolExecutor.map", cano / pp, "< 1x", cano < pp)
    ratio("cano / multiprocessing.Pool.map", cano / mp, "< 1x", cano < mp)


def case_medium(o: Opts) -> None:
    import joblib

    n = o.workers
    items = 400 if o.quick else MEDIUM
    iters = _calibrate(0.005)
    header("medium", f"{items:,} items of ~5 ms pure-Python CPU ({iters:,} turns), {n} workers")
    flow = _batch_flow(burn, n)
    sample = max(20, items // 10)
    with SharedStore() as store:
        store["n"], store["arg"] = items, iters
        par = joblib.Parallel(n_jobs=n)
        t = measure(
            {
                # sequential: a tenth of the items, scaled (the whole would take 10 s)
                "seq": lambda: [burn(iters) for _ in range(sample)],
                "cano": lambda: flow.orchestrate(store=store),
                "joblib": lambda: par(joblib.delayed(burn)(iters) for _ in range(items)),
            },
            o.reps(3),
            warmup=1,
        )
    seq = t["seq"] * items / sample
    row(f"sequential in the driver ({sample} items, scaled to {items:,})", fmt_time(seq))
    row("cano_mp BatchTask", fmt_time(t["cano"]), f"speedup {seq / t['cano']:.2f}x")
    row(f"joblib.Parallel(n_jobs={n})", fmt_time(t["joblib"]), f"speedup {seq / t['joblib']:.2f}x")
    goal = 1.8 if n == 2 else 0.9 * n
    ratio("cano speedup", seq / t["cano"], f"≥ {goal:.2f}x", seq / t["cano"] >= goal)
    ratio("cano / joblib", t["cano"] / t["joblib"])


MEMORY_ITEMS = 5_000_000


def is_multiple_of_7(x: int) -> bool:
    return x % 7 == 0


def _memory_child(n_workers: int, items: int) -> None:
    """Runs in a fresh interpreter: peak RSS of a driver mapping over a generator."""
    import resource

    flow = _batch_flow(is_multiple_of_7, n_workers, generator=True)
    with SharedStore() as store:
        store["n"] = 1000
        flow.orchestrate(store=store)  # workers started, everything imported
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        store["n"] = items
        t0 = time.perf_counter()
        flow.orchestrate(store=store)
        dt = time.perf_counter() - t0
        assert store["out"] == items
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(base * 1024, peak * 1024, dt)


def case_memory(o: Opts) -> None:
    n = o.workers
    items = 1_000_000 if o.quick else MEMORY_ITEMS
    header("memory", f"a generator of {items:,} items (x % 7 == 0), {n} workers")
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(n), str(items)],
        capture_output=True,
        text=True,
        check=True,
    )
    base, peak, dt = out.stdout.split()
    row("driver RSS before the batch", f"{int(base) / MB:8.1f} MB")
    row("driver peak RSS during it", f"{int(peak) / MB:8.1f} MB")
    row(f"time ({float(dt) / items * 1e9:.0f} ns per item)", fmt_time(float(dt)))
    ok = int(peak) < 200 * MB
    row("peak RSS", f"{int(peak) / MB:8.1f} MB", f"(goal < 200 MB: {met(ok)})")


# ----------------------------------------------------------------------------------------
# checkpoint
# ----------------------------------------------------------------------------------------

CKPT_MB = 200


def _ckpt_once(store: SharedStore, folder: str, durability: str) -> Callable[[], None]:
    """A fresh database in ``folder``, one checkpoint of ``store``, the database closed: what
    a one-state run pays, opening and closing included (the timed part of ``_ckpt_state``
    is inside it)."""
    from cano_mp._checkpoint import CheckpointStore

    def run() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        cs = CheckpointStore(os.path.join(folder, "b.db"), durability=durability)  # type: ignore[arg-type]
        cs.create_run("r", "bench")
        _ckpt_save(cs, store)
        cs.release("r")
        cs.close()

    return run


def _ckpt_save(cs: Any, store: SharedStore) -> None:
    """What a run does on entering a state (``Session._save``): data files, then the row."""
    from cano_mp._checkpoint.capture import Capture

    with cs.files.lock(exclusive=False):
        entries, refs = Capture(cs.files).entries(store._take_snapshot())
        dropped = cs.save("r", 1, "A", entries, {}, refs)
    cs.collect(dropped)


def _ckpt_state(store: SharedStore, folder: str, durability: str) -> Timed:
    """One checkpoint as a run pays it on entering a state: the database is open and the
    run recorded beforehand, the old files removed, all untimed (as ``np.save``'s)."""
    from cano_mp._checkpoint import CheckpointStore

    held: list[Any] = []

    def setup() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
        cs = CheckpointStore(os.path.join(folder, "b.db"), durability=durability)  # type: ignore[arg-type]
        cs.create_run("r", "bench")
        held.append(cs)

    def teardown() -> None:
        cs = held.pop()
        cs.release("r")
        cs.close()

    return Timed(lambda: _ckpt_save(held[-1], store), setup, teardown)


def _np_save(
    arr: Any, folder: str, fsync: bool, *, clean_untimed: bool
) -> Callable[[], None] | Timed:
    import numpy as np

    path = os.path.join(folder, "a.npy")

    def clean() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)

    def save() -> None:
        with open(path, "wb") as f:
            np.save(f, arr)
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    if clean_untimed:
        return Timed(save, clean)

    def run() -> None:
        clean()
        save()

    return run


def _np_save_shm(store: SharedStore, key: str, folder: str) -> Timed:
    """``np.save`` of the store's array as it lives in shared memory (the segment mapped
    afresh each time, as the checkpoint reads it): the peer with the same source pages."""
    import numpy as np

    from cano_mp._store import shm

    (path, nbytes) = store._take_snapshot().index[key][1][0]
    out = os.path.join(folder, "a.npy")

    def clean() -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)

    def save() -> None:
        mm = shm.map_readonly(path, nbytes)
        try:
            arr = np.frombuffer(mm, np.float64, count=nbytes // 8)
            with open(out, "wb") as f:
                np.save(f, arr)
            del arr
        finally:
            mm.close()

    return Timed(save, clean)


def case_checkpoint(o: Opts) -> None:
    import numpy as np

    from cano_mp import Observer

    n = o.workers
    header("checkpoint", f"{CHAIN}-state chain, checkpoint on vs off; {CKPT_MB} MB array")
    tmp = tempfile.mkdtemp(prefix="cano-bench-ckpt-", dir=os.getcwd())
    try:
        ex = cano_executor(n)
        flows = {}
        for on in (False, True):
            flow: Workflow[int] = Workflow(
                start=0, executor=ex, checkpoint=os.path.join(tmp, "c.db") if on else None
            )
            for s in range(CHAIN):
                flow.register(s, chain_step)
            flows[on] = flow.add_exit_state(CHAIN)
        with SharedStore() as store:
            store["small"] = {"k": list(range(10))}
            t = measure(
                {
                    "off": lambda: flows[False].orchestrate(store=store),
                    "on": lambda: flows[True].orchestrate(store=store),
                },
                o.reps(5),
                warmup=1,
            )
        row("per transition, checkpoint off", fmt_time(t["off"] / CHAIN))
        row("per transition, checkpoint on", fmt_time(t["on"] / CHAIN))
        ratio("on / off", t["on"] / t["off"], "≤ 2x", t["on"] / t["off"] <= 2)
        arr = np.random.default_rng(0).random(CKPT_MB * MB // 8)
        folder = os.path.join(tmp, "big")
        with SharedStore() as big:
            big["a"] = arr  # a store segment, as a task's put leaves it
            # A state entered: the database open, the old files gone (untimed, both sides).
            t = measure(
                {
                    "ckpt": _ckpt_state(big, folder, "normal"),
                    "npsave": _np_save(arr, folder, False, clean_untimed=True),
                    "npsave_shm": _np_save_shm(big, "a", folder),
                    "ckpt_fsync": _ckpt_state(big, folder, "fsync"),
                    "npsave_fsync": _np_save(arr, folder, True, clean_untimed=True),
                },
                o.reps(5),
            )
            # Once, as before: a new database opened and closed around the checkpoint, the
            # previous files removed inside the timing (np.save removes its own too).
            once = measure(
                {
                    "ckpt": _ckpt_once(big, folder, "normal"),
                    "npsave": _np_save(arr, folder, False, clean_untimed=False),
                },
                o.reps(3),
            )
        row(f"checkpoint of a {CKPT_MB} MB array, a state entered", fmt_time(t["ckpt"]))
        row("np.save of it, same directory", fmt_time(t["npsave"]))
        vs_save = t["ckpt"] / t["npsave"]
        ratio("checkpoint / np.save", vs_save, "≤ 1.3x", vs_save <= 1.3)
        row("np.save of the array as the store holds it (shared memory)", fmt_time(t["npsave_shm"]))
        ratio("checkpoint / np.save from shared memory", t["ckpt"] / t["npsave_shm"])
        row("checkpoint, durability='fsync'", fmt_time(t["ckpt_fsync"]))
        row("np.save + fsync", fmt_time(t["npsave_fsync"]))
        ratio("fsync checkpoint / np.save + fsync", t["ckpt_fsync"] / t["npsave_fsync"])
        row("a new database + checkpoint + close, old files removed", fmt_time(once["ckpt"]))
        row("np.save, old file removed", fmt_time(once["npsave"]))
        ratio("one-shot checkpoint / np.save", once["ckpt"] / once["npsave"])

        written: list[int] = []

        class Bytes(Observer):
            def on_checkpoint(self, run: Any, state: Any, seq: int, bytes_written: int) -> None:
                written.append(bytes_written)

        def make(store: Any) -> str:
            store["big"] = np.ones(CKPT_MB * MB // 8)
            return "touch"

        def other(store: Any) -> str:
            store["n"] = store.get("n", 0) + 1
            return "again" if store["n"] == 1 else "end"

        flow2: Workflow[str] = (
            Workflow(
                start="make", executor=ex, checkpoint=os.path.join(tmp, "d.db"), observers=[Bytes()]
            )
            .register("make", make)
            .register("touch", other)
            .register("again", other)
            .add_exit_state("end")
        )
        with SharedStore() as store:
            flow2.orchestrate(store=store)
        row("bytes written: the checkpoint after the array was made", f"{written[1]:>11}")
        row(
            "bytes written: a state that did not touch the array",
            f"{written[-1]:>11}",
            f"(goal 0 for the array: {met(written[-1] == 0)})",
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# limiter: the cost of one acquire() of a pool-wide rate limiter
# ----------------------------------------------------------------------------------------
LIMITER_CALLS = 100_000


class AcquireLoop(Task):  # type: ignore[type-arg]
    """A split branch: ``n`` acquire() calls on one shared limiter, timed in the worker."""

    config = NO_RETRY

    def __init__(self, tag: int, limiter: RateLimiter, n: int) -> None:
        self.tag, self.limiter, self.n = tag, limiter, n

    def run(self, store: Any) -> str:
        self.limiter.acquire()  # opens the shared cell: not part of the timing
        started = time.perf_counter()
        for _ in range(self.n):
            self.limiter.acquire()
        store[f"t{self.tag}"] = time.perf_counter() - started
        return "done"


def case_limiter(o: Opts) -> None:
    n = LIMITER_CALLS // (10 if o.quick else 1)
    header("limiter", f"acquire() of a token bucket that never runs dry, {n:,} calls")
    unlimited = 1e12  # tokens never run out: this measures the lock and the arithmetic
    cano = RateLimiter(rate=unlimited, burst=10**12)
    t = measure({"cano": lambda: [cano.acquire() for _ in range(n)]}, o.reps(5), warmup=1)
    cano_us = t["cano"] / n
    row("cano_mp RateLimiter.acquire(), uncontended", fmt_time(cano_us))
    try:
        import pyrate_limiter as prl
    except ImportError:
        row("pyrate-limiter", "not installed (pip install -e '.[bench]')")
        prl = None
    if prl is not None:
        peer = prl.Limiter(prl.Rate(10**9, prl.Duration.SECOND))
        t = measure(
            {"prl": lambda: [peer.try_acquire("x", blocking=False) for _ in range(n)]},
            o.reps(5),
            warmup=1,
        )
        prl_us = t["prl"] / n
        row("pyrate-limiter Limiter.try_acquire() (in-memory bucket)", fmt_time(prl_us))
        ratio("cano / pyrate-limiter (one process only)", cano_us / prl_us)
    row("goal uncontended", "<= 5 us", met(cano_us <= 5e-6))
    workers = 8
    shared = RateLimiter(rate=unlimited, burst=10**12)
    per = max(1, n // workers)
    flow = (
        Workflow(start="go", executor=cano_executor(workers))
        .register_split(
            "go",
            [AcquireLoop(i, shared, per) for i in range(workers)],
            JoinConfig(JoinStrategy.all(), "done"),
        )
        .add_exit_state("done")
    )
    with SharedStore() as store:
        flow.orchestrate(store=store)  # warm: workers started, plan sent
        started = time.perf_counter()
        flow.orchestrate(store=store)
        wall = time.perf_counter() - started
        inside = [store[f"t{i}"] for i in range(workers)]
    row(
        f"{workers} processes on one limiter: per call, in each",
        fmt_time(statistics.median(inside) / per),
        f"({os.cpu_count()} CPUs)",
    )
    row(f"{workers} processes: pool-wide throughput", f"{workers * per / wall:,.0f} acquires/s")


# ----------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------

CASES: dict[str, Callable[[Opts], None]] = {
    "chain": case_chain,
    "inline": case_inline,
    "bigdata": case_bigdata,
    "startup": case_startup,
    "fanout": case_fanout,
    "fanout_distinct": case_fanout_distinct,
    "scaling": case_scaling,
    "cancel": case_cancel,
    "instances": case_instances,
    "fairness": case_fairness,
    "observe": case_observe,
    "dask": lambda o: _case_dask(o),
    "arrayread": lambda o: _case_from("bench_arrays", "arrayread", o),
    "etl": lambda o: _case_from("bench_etl", "etl", o),
    "lateness": case_lateness,
    "idle": case_idle,
    "drift": case_drift,
    "tiny": case_tiny,
    "medium": case_medium,
    "memory": case_memory,
    "checkpoint": case_checkpoint,
    "limiter": case_limiter,
}
GROUPS = {
    "core": ["chain", "inline", "bigdata", "startup"],
    "split": ["fanout", "fanout_distinct", "scaling", "cancel"],
    "batch": ["tiny", "medium", "memory"],
    "concurrent": ["instances", "fairness"],
    "scheduler": ["lateness", "idle", "drift"],
    "observe": ["observe"],
    "dask": ["dask"],
    "arrays": ["arrayread", "etl"],
    "checkpoint": ["checkpoint"],
    "limiter": ["limiter"],
}
GROUPS["all"] = (
    GROUPS["core"]
    + GROUPS["split"]
    + GROUPS["batch"]
    + GROUPS["concurrent"]
    + GROUPS["scheduler"]
    + GROUPS["observe"]
)


def _shm_entries() -> set[str]:
    try:
        return set(os.listdir(SHM_ROOT))
    except OSError:
        return set()


def _shutdown_pools() -> None:
    shutdown_shared_pools()
    from loky import reusable_executor

    ex = getattr(reusable_executor._executor_storage, "executor", None)
    if ex is not None:
        ex.shutdown(wait=True, kill_workers=True)
    if "joblib" in sys.modules:
        from joblib.externals.loky import reusable_executor as jl

        jex = getattr(jl, "_executor", None)
        if jex is not None:
            jex.shutdown(wait=True, kill_workers=True)


def _report_leftovers(before: set[str]) -> None:
    """At exit, after cano_mp's own atexit cleanup: what this run left in /dev/shm."""
    own = f"cano_mp-{os.getpid()}-"
    left = sorted(
        e
        for e in _shm_entries() - before
        if e.startswith(own) or not e.startswith("cano_mp-")  # others' runs are not ours
    )
    print(f"shared memory left in {SHM_ROOT} by this run: {', '.join(left) or 'none'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="cano_mp beside its peers, measured in the same run (prints, never asserts)",
        epilog="groups: "
        + "; ".join(f"{g} = {' '.join(c)}" for g, c in GROUPS.items())
        + ". Default: core.",
    )
    parser.add_argument("names", nargs="*", help="groups or cases (default: core)")
    parser.add_argument(
        "--repeat", type=int, default=None, help="timed repetitions per measurement"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="pool size (default: loky.cpu_count())"
    )
    parser.add_argument("--quick", action="store_true", help="scaling: ~0.3 s branches")
    args = parser.parse_args(argv)
    names: list[str] = []
    for name in args.names or ["core"]:
        if name in GROUPS:
            names.extend(GROUPS[name])
        elif name in CASES:
            names.append(name)
        else:
            parser.error(f"unknown group or case {name!r} (known: {', '.join([*GROUPS, *CASES])})")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be >= 1")
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be >= 1")
    o = Opts(args.repeat, args.workers or max(1, int(loky.cpu_count())), args.quick)
    # Registered before cano_mp creates its shared-memory directory (whose atexit hook
    # removes it), so this runs after that hook.
    atexit.register(_report_leftovers, _shm_entries())
    print(
        f"cano_mp bench: python {sys.version.split()[0]}, {os.cpu_count()} CPUs "
        f"({loky.cpu_count()} usable), {o.workers} workers, medians of "
        + (f"{o.repeat} runs" if o.repeat else "the default number of runs")
    )
    started = time.perf_counter()
    try:
        for name in dict.fromkeys(names):
            CASES[name](o)
    finally:
        _shutdown_pools()
    print(f"\ndone in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--memory-child"]:
        _memory_child(int(sys.argv[2]), int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
