"""The ETL demo on a Dask cluster: the same workflow, only the executor changes.

    python examples/dask_cluster.py                          # a LocalCluster of 2 processes
    python examples/dask_cluster.py --workers 4 --size 50    # ~50 MB of CSV on 4 workers
    python examples/dask_cluster.py --scheduler tcp://scheduler:8786   # an existing cluster

Needs the ``dask`` extra: ``pip install 'cano-mp[dask]'``. The workflow is
``examples/etl_pipeline.py``'s ``build()``, given a ``DaskExecutor``: its splits become Dask
tasks, and the arrays the states pass on ("part0".., "clean", "feat0"..) travel by value —
"clean" is scattered once and read by every TRANSFORM branch.

On a cluster of several machines the workers need cano_mp and numpy installed, and the CSV
files on storage they all reach: pass ``--out`` on a shared file system.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import cloudpickle

sys.path.insert(0, str(Path(__file__).resolve().parent))

import etl_pipeline

# Dask workers cannot import this directory's modules: send the pipeline's code by value,
# as for functions defined in a script or a notebook.
cloudpickle.register_pickle_by_value(etl_pipeline)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=float, default=10.0, help="MB of CSV to generate")
    parser.add_argument("--out", default="out/etl-dask", help="where data and report go")
    parser.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes")
    parser.add_argument("--scheduler", default=None, help="address of an existing scheduler")
    args = parser.parse_args()

    from distributed import Client, LocalCluster

    from cano_mp.dask import DaskExecutor

    cluster = None
    if args.scheduler:
        client = Client(args.scheduler)
    else:
        cluster = LocalCluster(
            n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None
        )
        client = Client(cluster)
    try:
        client.wait_for_workers(1)
        with DaskExecutor(client) as executor:
            timer = etl_pipeline.StateTimer()
            flow = etl_pipeline.build(timer=timer, executor=executor)
            with flow.store as store:
                store["out_dir"] = os.path.abspath(args.out)
                store["size_mb"] = args.size
                started = time.perf_counter()
                final = flow.orchestrate()
                total = time.perf_counter() - started
                print(
                    f"finished in {final.name} after {total:.2f}s on "
                    f"{executor.max_workers} Dask worker threads ({client.scheduler.address})"
                )
                for name, seconds in timer.times:
                    print(f"  {name:<10} {seconds:8.3f}s")
                print(f"rows parsed: {store['rows_in']:,}; sensors reported: {store['sensors']}")
                print(f"report: {store['report']}")
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


if __name__ == "__main__":
    main()
