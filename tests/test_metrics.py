"""MFU: the FLOP count of the model, the peak of the device, and the per-device figures in the record."""

import json

import pytest
import torch

from parallel.topology import Topology
from pretrain.config_loading import load_config
from pretrain.metrics import Metrics, model_flops_per_token, peak_tflops
from pretrain.model import GPT

VOCAB = 128


def matmul_parameters(cfg) -> float:
    """Counted from the model itself: every matrix of the model is a matmul weight, except an untied embedding
    table (a lookup); of a stack of experts only top-k are active per token."""
    with torch.device("meta"):
        model = GPT(cfg, VOCAB, Topology.single())
    total = 0.0
    for name, p in model.named_parameters():
        if p.ndim < 2 or (name == "embedding.weight" and not cfg.tie_embeddings):
            continue
        total += p.numel() * (cfg.moe.top_k / cfg.moe.num_experts if ".experts." in name else 1.0)
    return total


@pytest.mark.parametrize("overrides", [
    [],
    ["model.tie_embeddings=true", "model.activation=gelu"],
    ["model.moe.num_experts=8", "model.moe.top_k=2", "model.moe.ffn_hidden_size=48",
     "model.moe.shared_expert_ffn_hidden_size=32", "model.moe.layer_freq=[0,1,1]"],
    ["model.head_dim=32", "model.qk_norm=true"],  # queries 4 x 32 = 128 wide on hidden 64
])
def test_flops_per_token_are_6_matmul_parameters_plus_attention(overrides):
    cfg = load_config(None, ["model.num_layers=3", "model.hidden_size=64", "model.num_attention_heads=4",
                             "model.num_query_groups=2", "model.seq_length=32", *overrides]).model
    expected = 6 * matmul_parameters(cfg) + 12 * 3 * (4 * cfg.head_size) * 32
    assert model_flops_per_token(cfg, VOCAB) == pytest.approx(expected, rel=1e-12)


def test_peak_of_the_device(monkeypatch):
    assert peak_tflops(torch.device("cpu"), "bf16", None) is None  # unknown: no MFU
    assert peak_tflops(torch.device("cpu"), "bf16", 100.0) == 100.0  # logging.peak_tflops wins
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_tflops(torch.device("cuda", 0), "bf16", None) == 989.4
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_tflops(torch.device("cuda", 0), "bf16", None) == 756.0
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_tflops(torch.device("cuda", 0), "fp32", None) == 66.9
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda", 0), "bf16", None) is None


def test_per_device_throughput_and_mfu_in_the_record(tmp_path):
    metrics = Metrics(str(tmp_path), total_steps=2, tokens_per_step=1000, tensorboard=False, devices=4,
                      flops_per_token=6e9, peak_tflops=100.0)
    metrics.record_step(3.0, 0.5)  # 2,000 tokens/s over 4 devices: 500 each, 3 TFLOP/s each
    metrics.log(1, {"lr": 1e-3, "grad_norm": 1.0})
    metrics.close()
    with open(tmp_path / "metrics.jsonl") as f:
        record = json.loads(f.readline())
    assert record["tokens_per_sec"] == 2000 and record["tokens_per_sec_per_device"] == 500
    assert record["tflops_per_device"] == pytest.approx(3.0) and record["mfu"] == pytest.approx(0.03)
    assert "memory_allocated_gib" not in record  # CPU


def test_peak_tflops_must_be_positive():
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="logging.peak_tflops"):
        load_config(None, ["logging.peak_tflops=0"]).validate()
