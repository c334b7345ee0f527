"""The Dask backend behind ``cano_mp.dask.DaskExecutor`` (whose docstring tells what crosses
the network and who owns it). Imported only when ``cano_mp.dask`` is.

::

    driver                                                        Dask worker process
    ------                                                        -------------------
    executor.DaskExecutor.submit(call)
      -> jobs.DaskJob (the shared Job record; its JobFuture names it)
      -> shipping.Shipper: units inline or scattered, snapshots
         by value, each once while unchanged
      -> client.submit(remote.run_remote, fn, call id, Layout,
                       blobs, segments, args)  ----------------->  remote.run_remote:
                                                                     unpack_blob (BlobCache,
                                                                     as a pool worker's),
                                                                     fn(cancelled, ...)
    executor: results thread  <--------------------------------   RemoteResult(outcome,
      (client.gather in batches; segments back to files)             segment bytes)
    control.Controller: control thread
      Cancel(job, grace) -> client.run(remote.flag_calls) ------>  remote.flags[call id]
      after the grace: client.cancel (+ restart_workers)
      Refresh() -> client.nthreads()

Modules: ``executor`` (the DaskExecutor: submitting, collecting), ``shipping`` (what goes to
the cluster once), ``control`` (cancelling, counting threads), ``jobs`` (the job record and
what the threads hand each other), ``remote`` (what runs on a Dask worker; needs no
``distributed``).
"""
