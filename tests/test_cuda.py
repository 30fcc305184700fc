"""What only a GPU can show: bf16 autocast, the grouped expert matmul in bf16, recomputation's memory and
compilation (the collectives' CUDA paths are in test_devices.py). Skipped without CUDA; `python -m
tools.device_check` runs them."""


import pytest
import torch

from conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_config(tmp_path, corpus, *overrides):
    return tiny_config(tmp_path, corpus, "run.device=cuda", "checkpoint.interval=0", "checkpoint.save_at_end=false",
                       "eval.interval=0", "model.hidden_size=128", "model.num_attention_heads=4",
                       "model.seq_length=64", *overrides)


def test_cuda_bf16_autocast_trains_like_fp32(tmp_path, tiny_corpus):
    """bf16 autocast against fp32 on the same batches: the first loss to bf16 rounding, then both fall."""
    from pretrain.trainer import Trainer

    losses = {}
    for dtype in ("fp32", "bf16"):
        trainer = Trainer(cuda_config(tmp_path / dtype, tiny_corpus, f"precision.dtype={dtype}"))
        losses[dtype] = [trainer.train_step()[0] for _ in range(6)]
    assert losses["bf16"][0] == pytest.approx(losses["fp32"][0], rel=2e-2)
    assert losses["bf16"][-1] < losses["bf16"][0] and losses["fp32"][-1] < losses["fp32"][0]


def test_cuda_grouped_expert_matmul_in_bf16_matches_the_loop():
    from parallel.topology import Topology
    from pretrain.config_loading import load_config
    from pretrain.model.moe import Experts

    cfg = load_config(None, ["model.hidden_size=128", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=256",
                             "model.moe.experts=auto"]).model
    experts = Experts(cfg, Topology.single()).cuda()
    torch.manual_seed(0)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    x = torch.randn(64, 128, device="cuda", requires_grad=True)
    counts, probs = [16, 0, 40, 8], torch.rand(64, device="cuda")
    outputs = {}
    for kind in ("grouped", "loop"):
        experts.kind = kind
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert experts.use_grouped(x) == (kind == "grouped")
            y = experts(x, counts, probs)
        y.float().square().sum().backward()
        outputs[kind] = (y.float(), x.grad.clone(), experts.up.grad.clone())
        x.grad = None
        experts.zero_grad()
    for grouped, loop in zip(outputs["grouped"], outputs["loop"]):
        torch.testing.assert_close(grouped, loop, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_cuda_recomputation_saves_memory_and_keeps_the_gradients(tmp_path, tiny_corpus, policy):
    """Peak memory of one forward and backward falls with recomputation; the gradients stay those of the plain model
    (bitwise on the CPU; here within fp32 rounding, as CUDA kernels may reduce in another order)."""
    from pretrain.trainer import Trainer

    results = {}
    for name in ("none", policy):
        trainer = Trainer(cuda_config(tmp_path / name, tiny_corpus, f"model.recompute={name}", "model.num_layers=4",
                                      "model.seq_length=256", "model.hidden_size=256", "train.global_batch_size=8",
                                      "train.micro_batch_size=8"))
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.forward_backward()
        torch.cuda.synchronize()
        results[name] = torch.cuda.max_memory_allocated() - before, trainer.grads.grad.clone()
        del trainer
    (plain_peak, plain_grad), (peak, grad) = results["none"], results[policy]
    assert peak < plain_peak, (policy, peak, plain_peak)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6)


def test_cuda_compiled_layers_train_like_eager(tmp_path, tiny_corpus):
    from pretrain.trainer import Trainer

    losses = {}
    for compiled in (False, True):
        trainer = Trainer(cuda_config(tmp_path / str(compiled), tiny_corpus, "precision.dtype=bf16",
                                      f"train.compile={str(compiled).lower()}"))
        losses[compiled] = [trainer.train_step()[0] for _ in range(3)]
    assert losses[True] == pytest.approx(losses[False], rel=2e-2)
