"""Activation recomputation and compilation give the gradients of the plain model.

Recomputation replays the same operations on the same values, so its gradients are bitwise those
without it (fp32, CPU), on one rank and on parallel layouts; compilation (inductor) fuses operations
and is compared within fp32 rounding."""

import json
import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import tiny_config
from multirank import run_ranks
from parallel.topology import Topology
from pretrain.config import ConfigError, compile_problem
from pretrain.config_loading import load_config
from pretrain.model import GPT
from pretrain.trainer import Trainer
from test_parallel_equivalence import full_gradients, layout_config

POLICIES = ("none", "full", "selective")
MOE = ("model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.ffn_hidden_size=32",
       "model.moe.router.z_loss_coeff=1e-3")


def gradients_by_policy(rank, world, cfg):
    """Loss, full gradients and MoE statistics of the same first batch under every policy, on one Trainer (the
    policy is a per-layer attribute); also whether every gradient bucket saw each of its weights exactly once."""
    trainer = Trainer(cfg, world, rank)
    out = {}
    for policy in POLICIES:
        for layer in trainer.model.layers.values():
            layer.recompute = policy
        trainer.loader = type(trainer.loader)(trainer.data, cfg.train.global_batch_size, cfg.train.micro_batch_size,
                                              dp_rank=trainer.topology.dp_rank, dp_size=trainer.topology.dp)
        loss = trainer.forward_backward()
        metrics = {k: v for feature in trainer.features for k, v in feature.metrics().items()}
        once = all(pending == 0 for pending in trainer.grads.pending.values())
        out[policy] = (loss, full_gradients(trainer), metrics, once)
    return out


def assert_policies_agree(results):
    for per_rank in results:
        loss, grads, metrics, once = per_rank["none"]
        assert once
        for policy in POLICIES[1:]:
            other_loss, other_grads, other_metrics, other_once = per_rank[policy]
            assert other_loss == loss and other_metrics == metrics and other_once, policy
            for name, g in grads.items():
                assert torch.equal(other_grads[name], g), f"{policy}: {name}"


@pytest.mark.parametrize("model", [(), ("model.gpas.enabled=true", "model.tie_embeddings=true"), MOE])
def test_recomputation_is_bitwise_on_one_rank(tmp_path, tiny_corpus, model):
    cfg = layout_config(tmp_path, tiny_corpus, *model)
    assert_policies_agree([gradients_by_policy(0, 1, cfg)])


@pytest.mark.parametrize("world, layout", [
    (2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    (2, ["parallel.pipeline=2"]),
    (2, ["parallel.context=2"]),
    (4, ["parallel.tensor=2", "parallel.sequence_parallel=true", "parallel.expert=4", "parallel.expert_tensor=1",
         *MOE]),
], ids=["TP2 SP", "PP2", "CP2", "MoE TP2 SP x DP2, EP4"])
def test_recomputation_is_bitwise_on_parallel_layouts(tmp_path, tiny_corpus, world, layout):
    cfg = layout_config(tmp_path, tiny_corpus, *layout)
    assert_policies_agree(run_ranks(world, gradients_by_policy, cfg))


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] = self.counts.get(func, 0) + 1
        return func(*args, **(kwargs or {}))


def backward_ops(policy: str) -> dict:
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                             "model.seq_length=16", f"model.recompute={policy}"]).model
    model = GPT(cfg, 64, Topology.single())
    model.init_parameters(0)
    loss = model(torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))).float().square().mean()
    with CountOps() as ops:
        loss.backward()
    return ops.counts


def test_selective_recomputes_the_elementwise_work_and_no_matmul():
    none, selective, full = (backward_ops(p) for p in POLICIES[:1] + ("selective", "full"))
    mm, silu = torch.ops.aten.mm.default, torch.ops.aten.silu.default
    assert none.get(silu, 0) == 0 and selective[silu] > 0 and full[silu] > 0  # activations recomputed
    assert selective[mm] == none[mm] < full[mm]  # full recomputes the projections, selective keeps them


def test_recompute_layers_picks_the_first_layers_of_each_stage():
    cfg = load_config(None, ["model.num_layers=4", "model.recompute=full", "model.recompute_layers=1"]).model
    from parallel.pipeline import Stage, pipeline_chunks

    chunks = pipeline_chunks(4, 2)
    for rank, first in ((0, "0"), (1, "2")):
        topology = Topology.build(load_config(None, ["parallel.pipeline=2"]).sizes(2), rank, create_groups=False)
        with torch.device("meta"):
            model = GPT(cfg, 64, topology, stage=Stage.of(topology, chunks, tie_embeddings=False))
        assert {i: layer.recompute for i, layer in model.layers.items()} == {
            first: "full", str(int(first) + 1): "none"}


@pytest.mark.parametrize("overrides, message", [
    (["model.recompute_layers=2"], "model.recompute_layers=2 counts the layers of model.recompute=full"),
    (["model.recompute=full", "model.recompute_layers=0"], "model.recompute_layers=0"),
    (["model.recompute=full", "model.recompute_layers=3", "parallel.pipeline=2"],
     "model.recompute_layers=3 is more than the 2 layer(s) of the smallest pipeline stage"),
    (["model.recompute=selective", "model.moe.num_experts=4", "model.moe.router.load_balancing=global_aux_loss"],
     "model.recompute=selective with model.moe.router.load_balancing=global_aux_loss"),
    (["model.recompute=full", "train.compile=true"], "train.compile=true with model.recompute=full"),
])
def test_bad_recompute_settings_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides).validate(2)


def test_compile_without_a_cpu_compiler_is_refused(monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    assert "needs a C++ compiler" in compile_problem("cpu")
    with pytest.raises(ConfigError, match="train.compile=true: inductor needs a C\\+\\+ compiler"):
        load_config(None, ["train.compile=true", "run.device=cpu"]).validate()


@pytest.mark.skipif(compile_problem("cpu") is not None, reason="inductor cannot compile here")
@pytest.mark.parametrize("extra", [(), MOE], ids=["dense", "moe"])
def test_compiled_layers_train_like_eager(tmp_path, tiny_corpus, extra):
    """Three steps with every decoder layer compiled by inductor against eager: losses and the reduced gradients
    within fp32 rounding (inductor fuses and reorders element-wise work: measured ~2e-7 relative on the loss).
    MoE: the routed part (dispatch, experts, combine) runs eagerly inside the compiled layer."""
    runs = {}
    for compiled in (False, True):
        cfg = tiny_config(tmp_path / str(compiled), tiny_corpus, f"train.compile={str(compiled).lower()}",
                          "checkpoint.interval=0", "checkpoint.save_at_end=false", "eval.interval=0", *extra)
        trainer = Trainer(cfg)
        losses = [trainer.train_step()[0] for _ in range(3)]
        runs[compiled] = losses, trainer.grads.grad.clone()
    (eager, eager_grad), (compiled, compiled_grad) = runs[False], runs[True]
    assert compiled == pytest.approx(eager, rel=1e-5)
    torch.testing.assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-6)


def test_the_compiling_step_is_reported_apart_from_throughput(tmp_path):
    from pretrain.metrics import Metrics

    metrics = Metrics(str(tmp_path), total_steps=3, tokens_per_step=100, tensorboard=False)
    metrics.record_step(5.0, 30.0, compiling=True)
    metrics.log(1, {"lr": 1e-3, "grad_norm": 1.0})
    metrics.record_step(4.0, 0.5)
    metrics.log(2, {"lr": 1e-3, "grad_norm": 1.0})
    metrics.close()
    with open(tmp_path / "metrics.jsonl") as f:
        first, second = (json.loads(line) for line in f)
    assert first["compile_seconds"] == 30.0 and "tokens_per_sec" not in first
    assert second["tokens_per_sec"] == 200.0 and "compile_seconds" not in second
    assert metrics.tokens == 200 and metrics.first_loss == 5.0
