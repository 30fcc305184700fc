"""Starting the process group and the few rank-wide operations the training loop needs.

torchrun (or Slurm through launch/slurm.sbatch) sets WORLD_SIZE, RANK and LOCAL_RANK; one
process per device. The backend follows the device (NCCL on GPUs, gloo on the CPU) unless
`parallel.backend` says otherwise, and every collective times out after
`parallel.timeout_minutes`, so a hang ends with an error naming the rank instead of a silent stall.
"""

from __future__ import annotations

import datetime
import os
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

from pretrain.config import Config, ConfigError

T = TypeVar("T")


def world_from_env() -> tuple[int, int]:
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device=cuda but no CUDA device is available: use run.device=auto or cpu")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(choice)


def cpu_lacks_native_bf16() -> bool:
    """Whether torch multiplies bf16 matrices on this CPU without oneDNN, whose bf16 kernels need AVX-512 (or
    Arm's bf16): it then falls back to a plain loop, measured 125x slower than fp32 on an AVX2-only machine.
    (torch's own check; a torch without it is taken to have the kernels.)"""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return probe is not None and not probe()
    except RuntimeError:
        return False


def setup(cfg: Config, world_size: int, rank: int) -> torch.device:
    """The device of this rank; starts the process group when there is more than one rank.

    The device is set (`torch.cuda.set_device`, in `resolve_device`) before the group starts, so that every
    NCCL call of this process, `all_gather_object` and `barrier` included, runs on this rank's GPU. With NCCL
    the group is bound to that GPU (`device_id`): torch then creates its communicator at once instead of at
    the first collective, and the groups `Topology.build` creates later are split from it, also at once. The
    first call on a group is then no longer the one that creates its communicator, which matters to the
    pipeline: a batched send/receive that is the first call on its group must involve every rank of it
    (torch's `batch_isend_irecv` docs), and the first tick of a schedule involves only two stages (StageLink
    also makes its first exchange a ring over every stage, so that this holds without eager creation too)."""
    device = resolve_device(cfg.run.device)
    backend = cfg.parallel.backend
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("parallel.backend=nccl needs CUDA devices: use parallel.backend=gloo (or auto) on the CPU")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=collective_timeout(cfg),
                                **process_group_binding(backend, device))
    return device


def process_group_binding(backend: str, device: torch.device) -> dict:
    """`init_process_group`'s device binding: `device_id` for NCCL (eager communicators, subgroups split from the
    default one), nothing for gloo, which does not use it (torch documents both effects as NCCL-only)."""
    return {"device_id": device} if backend == "nccl" else {}


def started() -> bool:
    """Whether the process group has started (and with it the key-value store the ranks share)."""
    return dist.is_initialized()


def first_to_report(message: str) -> bool:
    """Whether this rank is the first to report `message`: a counter per message in the process group's store,
    which is no collective, so a rank whose peers have died does not wait for them. True where the store cannot
    be reached (its host has ended), so that the message is not lost."""
    if not dist.is_initialized():
        return True
    try:
        return dist.distributed_c10d._get_default_store().add(f"foldtron/error/{message}", 1) == 1
    except Exception:  # a store that has gone answers with one of several error types
        return True


def collective_timeout(cfg: Config) -> datetime.timedelta:
    return datetime.timedelta(minutes=cfg.parallel.timeout_minutes)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank0_first(build: Callable[[], T]) -> T:
    """Run `build` on rank 0, then on the others: caches it writes (corpora, sample indices) are then
    read, never written twice or read half-written."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return build()
    if dist.get_rank() == 0:
        try:
            result = build()
        finally:  # on an error too: the others then meet the same error instead of waiting for rank 0
            dist.barrier()
    else:
        dist.barrier()
        result = build()
    return result


def any_rank(*flags: bool, device: torch.device) -> list[bool]:
    """Each flag, true if it is true on any rank: decisions that every rank must take together.

    The flags travel in a tensor on this rank's `device`: NCCL reduces only CUDA tensors (a CPU tensor has no
    backend in an NCCL process group). Reading the result back is a host sync on a GPU, once per call; the
    tensor is filled on the device (`torch.full`), not copied from host memory, so that is the only one."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    values = torch.stack([torch.full((), float(f), device=device) for f in flags])
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [v > 0 for v in values.tolist()]


def mean_over(value: torch.Tensor, group, size: int) -> torch.Tensor:
    """The mean of `value` over a group (a copy when the group has one rank)."""
    value = value.detach().clone()
    if size > 1:
        dist.all_reduce(value, group=group)
        value /= size
    return value


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
