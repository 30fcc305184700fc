"""What runs on GPUs with NCCL, checked as far as a machine can: on the CPU, that every helper gets its device
and that the calls NCCL is picky about are well formed; on one GPU (skipped without CUDA), that a training
step issues no host sync it does not mean to, and that the CUDA code paths around the collectives run with
NCCL at world size 1 and with gloo at world size 2 (two ranks on the one GPU: NCCL refuses to share it).

The CUDA tests run their ranks in spawned processes, so that the test process never initialises CUDA (the
CPU tests fork their ranks, which a process with CUDA initialised must not do)."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist

from conftest import tiny_config
from multirank import run_ranks
from parallel.topology import Sizes, Topology
from pretrain import distributed
from pretrain.config_loading import load_config
from pretrain.run_description import describe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


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
    """Every caller of any_rank (the kernel choice at start, the token-range check of each step and evaluation, the
    time limit) passes the trainer's device; with the test above, the all-reduce under NCCL then gets a tensor on
    the rank's GPU."""
    from pretrain.trainer import train

    devices = []
    real = distributed.any_rank

    def recording(*flags, device):
        devices.append(device)
        return real(*flags, device=device)

    monkeypatch.setattr(distributed, "any_rank", recording)
    cfg = tiny_config(tmp_path, tiny_corpus, "run.device=cpu", "train.iters=3", "train.time_limit_minutes=1e6")
    train(cfg)
    # the kernel choice, a range check per step and per evaluation, the time limit per step
    assert len(devices) == 1 + 3 + 1 + 3
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


@pytest.mark.parametrize("native", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_is_flagged(tmp_path, tiny_corpus, monkeypatch, native):
    """Without AVX-512 (which oneDNN's kernels need), torch multiplies bf16 matrices in a plain loop, ~100x slower
    than fp32: the run's description says so, and points to fp32. fp32 runs are not flagged on any CPU."""
    from pretrain.trainer import Trainer

    monkeypatch.setattr(distributed, "cpu_lacks_native_bf16", lambda: not native)
    for dtype in ("bf16", "fp32"):
        described = describe(Trainer(tiny_config(tmp_path / dtype, tiny_corpus, f"precision.dtype={dtype}")))
        flagged = "this CPU lacks AVX-512, which oneDNN's bf16" in described
        assert flagged == (dtype == "bf16" and not native), (dtype, described)


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


# ---------------------------------------------------------------- on one GPU


def gpu_config(run_dir, corpus: str, *overrides: str):
    return load_config(None, [
        f"run.dir={run_dir}", "run.device=cuda", "model.num_layers=2", "model.hidden_size=64",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.seq_length=64", "model.vocab_multiple=64",
        "train.iters=4", "train.global_batch_size=8", "train.micro_batch_size=2", "optimizer.lr=1e-3",
        "scheduler.warmup_iters=1",
        f"data.sources={{tiny: {{prefixes: [{corpus}]}}}}", "eval.interval=2", "eval.iters=1",
        "logging.interval=1", "logging.tensorboard=false", "checkpoint.interval=2", *overrides,
    ])


def synchronising_calls(rank, world, cfg):
    """After a warm-up step: the gradients of a step under set_sync_debug_mode("error") (the loss stays on the
    device: reading it is the step's intended sync); then clipping (which reads the norm), and the optimizer
    step and the features' end of step under "warn", counting the warnings; and how many times the MoE
    dispatchers waited for their counts on the host (an event wait, which the sync debug mode does not see)."""
    import warnings

    from parallel import transfers
    from pretrain.model.moe import MoE
    from pretrain.trainer import Trainer

    trainer = Trainer(cfg, world, rank)
    trainer.train_step()
    waits = [0]
    real_wait = transfers.HostCopy.wait

    def counted(self):
        waits[0] += 1
        return real_wait(self)

    transfers.HostCopy.wait = counted
    torch.cuda.synchronize()
    try:
        torch.cuda.set_sync_debug_mode("error")
        loss = trainer.accumulate_gradients(trainer.next_micro_batches())
        torch.cuda.set_sync_debug_mode("default")
        trainer.clip_gradients()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            trainer.optimizer.step()
            for feature in trainer.features:
                feature.end_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
        transfers.HostCopy.wait = real_wait
    return {"loss": float(loss), "waits": waits[0], "optimizer_syncs": [str(w.message) for w in caught],
            "moe_layers": sum(isinstance(layer.mlp, MoE) for layer in trainer.model.layers.values()),
            "micro_batches": trainer.loader.micro_batches_per_step}


@cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp8 tensorwise", "fp8 delayed"])
def test_a_dense_step_issues_no_host_sync(tmp_path, tiny_corpus, precision):
    if precision.startswith("fp8") and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability 8.9+")
    fp8 = (["precision.dtype=bf16", "precision.fp8.enabled=true", f"precision.fp8.recipe={precision.split()[1]}"]
           if precision.startswith("fp8") else [f"precision.dtype={precision}"])
    cfg = gpu_config(tmp_path / "run", tiny_corpus, *fp8)
    (result,) = run_ranks(1, synchronising_calls, cfg, start_method="spawn")
    assert torch.isfinite(torch.tensor(result["loss"])) and result["waits"] == 0
    assert result["optimizer_syncs"] == []


@cuda
@pytest.mark.parametrize("dispatcher, recompute", [("alltoall", "none"), ("allgather", "none"),
                                                   ("alltoall", "full")])
def test_a_moe_step_waits_for_its_counts_once_per_layer(tmp_path, tiny_corpus, dispatcher, recompute):
    """2 MoE layers of 4 experts, all local (the reordering runs), bf16 (the grouped matmul runs): the only host
    waits are the dispatchers' (one per layer and micro-batch, twice with recomputation), none that the sync
    debug mode sees."""
    cfg = gpu_config(tmp_path / "run", tiny_corpus, "precision.dtype=bf16", "model.moe.num_experts=4",
                     f"model.moe.dispatcher={dispatcher}", f"model.recompute={recompute}",
                     "model.moe.router.z_loss_coeff=1e-3")
    (result,) = run_ranks(1, synchronising_calls, cfg, start_method="spawn")
    assert result["moe_layers"] == 2
    per_forward = result["moe_layers"] * result["micro_batches"]
    assert result["waits"] == per_forward * (2 if recompute == "full" else 1)


def nccl_world_of_one(rank, world, cfg):
    """The process group as distributed.setup starts it for NCCL (bound to the device), then a run with
    evaluation and checkpoints (DCP's object collectives over NCCL need the current device set) and a second
    run, which resumes from the last checkpoint (DCP's load over NCCL) and finds nothing left to train."""
    from pretrain.trainer import train

    device = distributed.resolve_device("cuda")
    dist.init_process_group("nccl", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                            **distributed.process_group_binding("nccl", device))
    bound = dist.distributed_c10d._get_default_group().bound_device_id
    values = torch.ones(1, device=device)
    dist.all_reduce(values)
    gathered = [None]
    dist.all_gather_object(gathered, {"layer": 1.0})
    first, resumed = train(cfg), train(cfg)
    return {"bound": str(bound), "sum": float(values), "gathered": gathered, "first": first, "resumed": resumed}


@cuda
def test_nccl_at_world_size_one_trains_and_checkpoints(tmp_path, tiny_corpus):
    cfg = gpu_config(tmp_path / "run", tiny_corpus)
    (result,) = run_ranks(1, nccl_world_of_one, cfg, start_method="spawn", backend=None)
    assert result["bound"] == "cuda:0" and result["sum"] == 1.0 and result["gathered"] == [{"layer": 1.0}]
    assert result["first"]["step"] == 4 and result["resumed"]["step"] == 4  # the second run resumes at the end


def gloo_on_one_gpu(rank, world, cfg):
    """Two gloo ranks on the one GPU: a data-parallel run (gloo reduces and broadcasts CUDA tensors; its other
    collectives are CPU-only), recording the device of every tensor handed to a collective."""
    from pretrain.trainer import Trainer

    os.environ["LOCAL_RANK"] = "0"  # both ranks on cuda:0
    devices = set()
    originals = {name: getattr(dist, name) for name in ("all_reduce", "broadcast")}

    def recording(name):
        def wrapped(tensor, *args, **kwargs):
            devices.add(str(tensor.device))
            return originals[name](tensor, *args, **kwargs)
        return wrapped

    for name in originals:
        setattr(dist, name, recording(name))
    try:
        trainer = Trainer(cfg, world, rank)
        losses = [trainer.train_step() for _ in range(3)]
        trainer.evaluate()
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return {"losses": losses, "devices": devices}


@cuda
def test_gloo_ranks_on_one_gpu_hand_collectives_cuda_tensors_only(tmp_path, tiny_corpus):
    cfg = gpu_config(tmp_path / "run", tiny_corpus, "parallel.backend=gloo")
    results = run_ranks(2, gloo_on_one_gpu, cfg, start_method="spawn")
    assert results[0]["losses"] == results[1]["losses"]  # (loss, grad norm) decided together
    assert all(r["devices"] == {"cuda:0"} for r in results)
