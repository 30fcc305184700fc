"""Run a function on N gloo ranks on the CPU (forked processes) and collect what each returns.

On a GPU, ranks must not be forked from a process that may have touched CUDA: `start_method="spawn"` starts
fresh interpreters instead, and `backend=None` leaves starting the process group to the function (NCCL)."""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args, results, backend) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # N ranks share 2 cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    try:  # a short timeout: a rank that waits for a dead peer fails instead of hanging the suite
        if backend is not None:
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
        # plain pickle: tensors travel by value, not as shared memory that dies with this process
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # reported to the parent, which fails the test with the rank's traceback
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class RankDied(AssertionError):
    """A rank ended without a result or an error (killed, crashed in native code): not a test failure."""


def run_ranks(world: int, fn, *args, timeout: float = 300.0, start_method: str = "fork",
              backend: str | None = "gloo") -> list:
    """fn(rank, world, *args) on each rank, the process group already started (`backend` None: not started;
    MASTER_ADDR/MASTER_PORT are set for fn to start it); returns the results by rank. `start_method` "spawn"
    for ranks that use CUDA (fn and args must then pickle: a module-level function).

    A rank that dies without reporting (or a port taken between choosing and binding it) is a fault of the
    machine, not of the code under test: the ranks are started once more. A rank that raises fails the test."""
    try:
        return _run_once(world, fn, args, timeout, start_method, backend)
    except RankDied as err:
        print(f"multirank: {err}; starting the ranks again")
        return _run_once(world, fn, args, timeout, start_method, backend)


def _run_once(world: int, fn, args, timeout: float, start_method: str, backend) -> list:
    # fork: ranks start with what the test process imported, no seconds of imports each
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results, backend)) for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, status, value = results.get(timeout=2.0)
            except queue.Empty:
                # a rank's result is in the queue before it exits: one that exited without it died
                dead = [r for r, p in enumerate(procs) if p.exitcode is not None and r not in out]
                if dead:
                    raise RankDied(f"rank(s) {dead} died with exit code {procs[dead[0]].exitcode}") from None
                if time.monotonic() > deadline:
                    raise AssertionError(f"ranks {sorted(set(range(world)) - set(out))} did not finish") from None
                continue
            if status == "error":
                if "Address already in use" in value:
                    raise RankDied(f"rank {rank} found its port taken")
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    return [out[r] for r in range(world)]
