"""What runs on GPUs with NCCL, checked as far as the CPU can: that every helper gets its device and that
the calls NCCL is picky about are well formed."""

import os

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_config
from multirank import run_ranks
from parallel.topology import Sizes, Topology
from pretrain import distributed


# ---------------------------------------------------------------- on the CPU


def test_any_rank_reduces_a_tensor_on_the_given_device(monkeypatch):
    """NCCL reduces CUDA tensors only: the flags must be put on the rank's device, not on the CPU by default.
    A device the CPU build has no kernels for (meta) shows where the tensor was made; the fake collective
    stops there, before the values would be read back."""
    seen = []

    class Reduced(Exception):
        pass

    def all_reduce(tensor, *args, **kwargs):
        seen.append(tensor.device)
        raise Reduced

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    with pytest.raises(Reduced):
        distributed.any_rank(True, False, device=torch.device("meta"))
    assert seen == [torch.device("meta")]


def test_the_trainer_gives_every_rank_wide_decision_its_device(tmp_path, tiny_corpus, monkeypatch):
    """Both callers of any_rank (the token-range check of each step and evaluation, the time limit) pass the
    trainer's device; with the test above, the all-reduce under NCCL then gets a tensor on the rank's GPU."""
    from pretrain.trainer import train

    devices = []
    real = distributed.any_rank

    def recording(*flags, device):
        devices.append(device)
        return real(*flags, device=device)

    monkeypatch.setattr(distributed, "any_rank", recording)
    cfg = tiny_config(tmp_path, tiny_corpus, "run.device=cpu", "train.iters=3", "train.time_limit_minutes=1e6")
    train(cfg)
    assert len(devices) == 3 + 1 + 3  # a range check per step and per evaluation, the time limit per step
    assert set(devices) == {torch.device("cpu")}


def test_nccl_binds_the_process_group_to_the_rank_s_device(tmp_path, tiny_corpus, monkeypatch):
    """init_process_group(..., device_id=cuda:LOCAL_RANK) for NCCL (eager communicators, subgroups split from
    the default group); no device_id for gloo. The call is recorded, not made: this machine has no NCCL."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(distributed, "resolve_device", lambda choice: torch.device("cuda", 3))
    cfg = tiny_config(tmp_path, tiny_corpus, "parallel.backend=nccl")
    assert distributed.setup(cfg, 8, 3) == torch.device("cuda", 3)
    (args, kwargs), = calls
    assert args == ("nccl",) and kwargs["device_id"] == torch.device("cuda", 3)
    assert kwargs["rank"] == 3 and kwargs["world_size"] == 8
    assert distributed.process_group_binding("gloo", torch.device("cuda", 3)) == {}
    assert distributed.process_group_binding("gloo", torch.device("cpu")) == {}


def first_batched_exchange(rank, world):
    """The peers of this rank's first batched send/receive on its pipeline group, and what it received."""
    from parallel.pipeline import StageLink

    topology = Topology.build(Sizes(world=world, pp=world), rank)
    first = []
    real = dist.batch_isend_irecv

    def recording(ops):
        if not first:
            first.append(sorted((op.op.__name__, op.peer) for op in ops))
        return real(ops)

    dist.batch_isend_irecv = recording
    try:
        StageLink(topology, (1, 2, 3), dtype=torch.float32, device=torch.device("cpu"))
    finally:
        dist.batch_isend_irecv = real
    return first[0]


@pytest.mark.parametrize("stages", [2, 4])
def test_the_pipeline_group_s_first_batched_exchange_involves_every_stage(stages):
    """torch: a batch_isend_irecv that is the first call on its group must involve all its ranks. Creating the
    StageLink is that first call, on every stage, each with its neighbours on the ring of stages."""
    for rank, ops in enumerate(run_ranks(stages, first_batched_exchange)):
        neighbours = sorted({(rank + 1) % stages, (rank - 1) % stages})
        assert ops == sorted([("irecv", n) for n in neighbours] + [("isend", n) for n in neighbours])


@pytest.mark.parametrize("overrides, preset, expected", [
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], None, "1"),
    (["parallel.tensor=2", "parallel.sequence_parallel=true"], "8", "8"),  # the environment's choice is kept
    (["parallel.tensor=2"], None, None),  # no sequence parallelism: left alone
    (["parallel.sequence_parallel=true"], None, None),  # TP1: sequence parallelism has no effect
])
def test_sequence_parallelism_serializes_kernel_launches(monkeypatch, overrides, preset, expected):
    """CUDA_DEVICE_MAX_CONNECTIONS is set before the trainer starts (CUDA reads it when its context is made)."""
    import pretrain.__main__ as entry
    import pretrain.trainer

    seen = []
    monkeypatch.setattr(pretrain.trainer, "train",
                        lambda cfg, world_size, rank: seen.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS")))
    if preset is None:
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    else:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", preset)
    assert entry.main(overrides) == 0
    assert seen == [expected]
