"""What runs inside a local pool worker process, and what it shares with the driver.

::

    driver (cano_mp._executors.pool)                    worker process (loop.worker_main)
    --------------------------------                    ---------------------------------
    RunCall("call", seq, fn, new_blobs, keys,  ------>  unpickle new_blobs into BlobCache
            args, deadline, log_level)                  (an LRU per category, mirrored
                                                        exactly by the driver: it always
                                                        knows what a worker holds)
                                                        fn(control, deadline, *blobs, *args)
    Stop("stop")  ---------------------------------->   exit
                  <---  LogMessage("log", seq, record, tags)   any number, while a call runs
                  <---  Returned("returned", seq, result) | Raised("raised", seq, text)
                  <---  InitFailed("init_failed", text)        the initializer raised
    flags file: CANCEL  ---------------------------->   control() is True: stop soon
                PROGRESS_SEQ, POSITION, STARTED <---    which item of a chunk runs, since when

One worker per duplex pipe, FIFO both ways; the message records live in ``cano_mp._wire``
and travel as plain tuples. Modules:

- ``loop`` — ``worker_main``: the process's setup (its own process group, SIGINT ignored,
  exit when the driver dies: PR_SET_PDEATHSIG plus a parent watchdog, the flags file
  mapped) and the call loop.
- ``flags`` — the flags file's layout; ``CallControl`` (the worker's side: ``control()``,
  batch progress) and ``read_progress`` / ``request_cancel`` (the driver's side).
- ``logs`` — a task's log records forwarded to the driver's loggers.
"""
