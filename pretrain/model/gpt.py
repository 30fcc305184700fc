"""A decoder-only, Llama-style transformer written once against the parallel layers.

token embedding -> N x [norm -> attention -> add (-> GPAS) -> norm -> MLP -> add (-> GPAS)]
-> final norm -> output layer (optionally tied to the embedding).

Attention is grouped-query with rotary position embeddings and causal
`scaled_dot_product_attention`; the MLP is SwiGLU (GELU as an option). The fused
query/key/value weight is laid out query group by query group, so tensor parallelism
splits it into whole heads. Under context parallelism a rank holds two chunks of each
sequence and `positions` says where they are; attention then sees the whole sequence.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import apex_backend, context_parallel
from parallel.pipeline import Stage
from parallel.placement import placement_of, replicated
from parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, enter_tensor_parallel, init_normal_,
    vocab_parallel_linear_cross_entropy,
)
from parallel.topology import Topology
from pretrain.config import ModelConfig, RopeScalingConfig, ceil_to
from pretrain.model import recompute
from pretrain.model.features import ModelFeature
from pretrain.model.gpas import GPASFeature, GPASGate
from pretrain.model.kv_cache import KVCache
from pretrain.model.moe import MoE, MoEFeature


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the hidden dimension. Under sequence parallelism its weights see only this rank's
    tokens (their gradients are summed over TP).

    `model.norm_impl` only picks the function that computes it: torch's (the reference) or NVIDIA apex's fused
    kernel (parallel/apex_backend.py), with the same parameters, placements and dtypes, so that checkpoints and
    layouts do not depend on it. The trainer resolves `auto` for its device before building the model; a model
    built with `auto` elsewhere computes with torch."""

    def __init__(self, cfg: ModelConfig, topology: Topology):
        super().__init__()
        self.kind, self.eps, size = cfg.norm, cfg.norm_eps, cfg.hidden_size
        sp = topology.sequence_parallel
        self.weight = replicated(nn.Parameter(torch.ones(size)), partial_over_tp=sp)
        self.bias = replicated(nn.Parameter(torch.zeros(size)), partial_over_tp=sp) if self.kind == "layernorm" \
            else None
        self.apex_norm = apex_backend.norm_function(self.kind) if cfg.norm_impl == "apex" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.apex_norm is not None:
            return self.apex_norm(x, self.weight, self.bias, self.eps)
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                   scaling: RopeScalingConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [batch, 1, seq, head_dim] for the given (global) positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    if scaling is not None and scaling.type is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = positions.float()[..., None] * inv_freq  # [b, s, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, r: RopeScalingConfig) -> torch.Tensor:
    """Llama-3.1's rescaled frequencies, as transformers' `_compute_llama3_parameters` computes them (fp32): a
    wavelength above original / low_freq_factor is stretched by `factor`, one below original / high_freq_factor
    kept, and those between blended linearly in original / wavelength."""
    old = r.original_max_position_embeddings
    low_wavelen, high_wavelen = old / r.low_freq_factor, old / r.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / r.factor, inv_freq)
    smooth = (old / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class HeadNorm(nn.Module):
    """RMSNorm over head_dim, one weight [head_dim] shared by every head (Qwen3's q_norm and k_norm). Each
    tensor-parallel rank normalises only its own heads, so the weight's gradient on a rank is a partial sum over TP
    (with or without sequence parallelism): its placement says so, and the reducer sums it over TP as it sums the
    norms under sequence parallelism."""

    def __init__(self, cfg: ModelConfig, topology: Topology):
        super().__init__()
        self.eps = cfg.norm_eps
        self.weight = replicated(nn.Parameter(torch.ones(cfg.head_size)), partial_over_tp=topology.tp > 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in fp32 (the fp32 weight; under autocast x comes bf16 from the matmul), as transformers computes it
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight, self.eps).to(x.dtype)


class Attention(nn.Module):
    """`number`: the global number of its layer, which names its keys and values in a generation cache."""

    def __init__(self, cfg: ModelConfig, topology: Topology, number: int = 0):
        super().__init__()
        self.number = str(number)
        self.head_dim = cfg.head_size
        self.local_groups = cfg.query_groups // topology.tp
        self.heads_per_group = cfg.num_attention_heads // cfg.query_groups
        qkv_size = (cfg.num_attention_heads + 2 * cfg.query_groups) * self.head_dim
        self.cp_group = topology.cp_group
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, topology)
        self.q_norm = HeadNorm(cfg, topology) if cfg.qk_norm else None
        self.k_norm = HeadNorm(cfg, topology) if cfg.qk_norm else None
        self.out = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, topology)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        """With a generation `cache`, x holds the new tokens of every cache row flattened into one sequence
        [1, rows x new, hidden] (see GPT.decode), and attention also sees the row's cached tokens."""
        qkv = self.qkv(x)  # [b, s, local heads and groups]: the whole local sequence, also under SP
        shape = qkv.shape
        b = cache.rows if cache is not None else shape[0]
        s = shape[0] * shape[1] // b
        qkv = qkv.view(b, s, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.heads_per_group].reshape(b, s, -1, self.head_dim)  # [b, s, local heads, d]
        k, v = qkv[:, :, :, -2], qkv[:, :, :, -1]  # [b, s, local groups, d]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            y = cache.attend(self.number, q, k, v, enable_gqa=self.heads_per_group > 1)
        else:
            y = context_parallel.attention(q, k, v, positions=positions, cp_group=self.cp_group,
                                          enable_gqa=self.heads_per_group > 1)
        return self.out(y.transpose(1, 2).reshape(shape[0], shape[1], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, topology: Topology, ffn_size: int | None = None):
        super().__init__()
        ffn = ffn_size or cfg.ffn_size
        self.gate = ColumnParallelLinear(cfg.hidden_size, ffn, topology) if cfg.activation == "swiglu" else None
        self.up = ColumnParallelLinear(cfg.hidden_size, ffn, topology)
        self.down = RowParallelLinear(ffn, cfg.hidden_size, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tensor_parallel(x, self.up.topology)  # once for gate and up
        if self.gate is not None:
            h = F.silu(self.gate(x, entered=True)) * self.up(x, entered=True)
        else:
            h = F.gelu(self.up(x, entered=True), approximate="tanh")
        return self.down(h)


class TransformerLayer(nn.Module):
    """`recompute`: the activation recomputation of this layer ("none", "selective", "full": see recompute.py)."""

    def __init__(self, cfg: ModelConfig, topology: Topology, number: int, *, recompute: str = "none"):
        super().__init__()
        self.recompute = recompute
        self.attn_norm = Norm(cfg, topology)
        self.attention = Attention(cfg, topology, number)
        self.mlp_norm = Norm(cfg, topology)
        if cfg.moe.is_moe_layer(number):
            shared = cfg.moe.shared_expert_ffn_hidden_size
            self.mlp = MoE(cfg, topology, MLP(cfg, topology, shared) if shared else None)
        else:
            self.mlp = MLP(cfg, topology)
        self.gpas = GPASGate(sequence_parallel=topology.sequence_parallel) if cfg.gpas.enabled else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return recompute.run(self.recompute, self, self._forward, x, cos, sin, positions)

    def _forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                 cache: KVCache | None = None) -> torch.Tensor:
        """The layer itself: `forward` adds recomputation around it; generation calls it directly with its cache
        (no gradients, and a compiled `forward` would not take the cache)."""
        x = x + self.attention(self.attn_norm(x), cos, sin, positions, cache)
        if self.gpas is not None:
            x = self.gpas(x)
        x = x + self.mlp(self.mlp_norm(x))
        if self.gpas is not None:
            x = self.gpas(x)
        return x


class GPT(nn.Module):
    """The model, or under pipeline parallelism one stage of it (`stage`, from parallel/pipeline.py: the global
    numbers of the decoder layers of each of its chunks, and whether it holds the embedding and the output
    layer). Parameter names keep the global layer numbers (`layers.7.mlp.up.weight` on any stage)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, topology: Topology, *, stage: Stage | None = None):
        super().__init__()
        self.cfg, self.topology, self.vocab_size = cfg, topology, vocab_size
        if stage is None and topology.pp > 1:
            raise ValueError("a model on a pipeline of several stages needs its stage (parallel.pipeline.Stage.of)")
        self.stage = stage = stage or Stage.whole(cfg.num_layers, tie_embeddings=cfg.tie_embeddings)
        self.head_dim = cfg.head_size
        self.embedding = (VocabParallelEmbedding(vocab_size, cfg.hidden_size, topology)
                          if stage.holds_embedding else None)
        numbers = [i for layers in stage.chunks for i in layers]
        recomputed = numbers[:cfg.recompute_layers] if cfg.recompute == "full" and cfg.recompute_layers else numbers
        self.layers = nn.ModuleDict({str(i): TransformerLayer(cfg, topology, i, recompute=cfg.recompute
                                                              if i in recomputed else "none") for i in numbers})
        self.final_norm = Norm(cfg, topology) if stage.last else None
        self.output = None
        if stage.last and not cfg.tie_embeddings:
            self.output = ColumnParallelLinear(cfg.hidden_size, vocab_size, topology)
        stage.assign([self.chunk_parameters(c) for c in range(len(stage.chunks))],
                     self.embedding.weight if self.embedding is not None else None)

    def chunk_parameters(self, chunk: int) -> list[nn.Parameter]:
        """The parameters that chunk `chunk` of this stage uses."""
        modules = [self.layers[str(i)] for i in self.stage.chunks[chunk]]
        if self.stage.starts_model(chunk):
            modules.insert(0, self.embedding)
        if self.stage.ends_model(chunk):
            modules += [self.final_norm, self.output if self.output is not None else self.embedding]
        return list(dict.fromkeys(p for m in modules for p in m.parameters()))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, chunk: int = 0,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """Runs one chunk of this stage. The first chunk of the first stage takes token ids [batch, seq],
        the others the previous chunk's hidden states. The last chunk of the last stage returns, given
        `labels` [batch, seq], the per-token losses [batch, seq] (fp32) of the output layer fused with the
        cross-entropy, `model.loss_chunk_tokens` tokens at a time, so that training never holds the logits;
        without labels, logits [batch, seq, vocab / TP] (this rank's vocabulary slice). The other chunks
        return hidden states.

        `positions` [batch, seq]: the global positions of the tokens (context parallelism holds
        chunks of each sequence); by default 0..seq-1 (first stage only)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        if self.stage.starts_model(chunk):
            x = self.embedding(x)
        for i in self.stage.chunks[chunk]:
            x = self.layers[str(i)](x, cos, sin, positions)
        if not self.stage.ends_model(chunk):
            return x
        x = enter_tensor_parallel(self.final_norm(x), self.topology)  # [batch, seq, hidden], also under SP
        weight = self.output.weight if self.output is not None else self.embedding.weight  # [vocab / TP, hidden]
        if labels is not None:
            return vocab_parallel_linear_cross_entropy(x, weight, labels, topology=self.topology,
                                                       chunk_tokens=self.cfg.loss_chunk_tokens)
        return self.output(x, entered=True) if self.output is not None else F.linear(x, weight)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Generation: run the new tokens `ids` [rows, new] of every cache row through the model, writing their
        keys and values into `cache`, and return the logits of each row's last new token [rows, vocab / TP]
        (this rank's vocabulary slice).

        The tokens travel flattened into one sequence [1, rows x new], so that sequence parallelism splits
        them like any sequence (rows x new must then be a multiple of TP: pad the rows) and every token-local
        part of the model, MoE included, runs as in training; attention unflattens them by the cache's rows.
        Pipeline and context parallelism are refused here (pretrain/generation.py checks it first)."""
        if self.topology.pp > 1 or self.topology.cp > 1:
            raise ValueError("generation runs without pipeline or context parallelism")
        rows, new = ids.shape
        positions = cache.positions(new)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        x = self.embedding(ids.reshape(1, rows * new))
        for i in self.stage.chunks[0]:
            x = self.layers[str(i)]._forward(x, cos, sin, positions, cache)
        cache.advance(new)
        x = enter_tensor_parallel(self.final_norm(x), self.topology).view(rows, new, -1)[:, -1]
        weight = self.output.weight if self.output is not None else self.embedding.weight
        return F.linear(x, weight)

    def features(self) -> list[ModelFeature]:
        """The model features the training loop drives (see pretrain/model/features.py), on every stage of a
        model that has them."""
        features: list[ModelFeature] = []
        if self.cfg.moe.num_experts:
            routers = {i: layer.mlp.router for i, layer in self.layers.items() if isinstance(layer.mlp, MoE)}
            features.append(MoEFeature(routers, self.topology, z_loss=self.cfg.moe.router.z_loss_coeff > 0))
        if self.cfg.gpas.enabled:
            gates = {i: layer.gpas for i, layer in self.layers.items()}
            features.append(GPASFeature(gates, self.topology, self.cfg.gpas.gate_grad_clip))
        return features

    def num_parameters(self) -> int:
        """Parameters of the whole model (all shards), each counted once."""
        return sum(placement_of(p).global_numel for p in self.parameters())

    @torch.no_grad()
    def init_parameters(self, seed: int) -> None:
        """Draw every parameter from a generator keyed by (seed, name), then keep this rank's slice,
        so the same seed gives the same model whatever the parallel layout."""
        scaled_std = (self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers) if self.cfg.scaled_init
                      else self.cfg.init_std)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias") or name.endswith("gpas.gate"):
                param.zero_()
            else:
                std = scaled_std if name.endswith(("attention.out.weight", "down.weight", "experts.down")) \
                    else self.cfg.init_std
                if placement_of(param).expert:
                    _init_experts(param, name, seed=seed, std=std)
                else:
                    init_normal_(param, std, torch.Generator().manual_seed(_name_seed(seed, name)))


def _init_experts(param: nn.Parameter, name: str, *, seed: int, std: float) -> None:
    """Each expert from its own generator, keyed by its global number: any EP x ETP layout gets the same experts."""
    placement = placement_of(param)
    piece = placement.local_slices()[1:]  # of each expert's matrix (split over ETP)
    for local, expert in enumerate(placement.experts):
        generator = torch.Generator().manual_seed(_name_seed(seed, f"{name}.{expert}"))
        full = torch.empty(placement.global_shape[1:]).normal_(0.0, std, generator=generator)
        param[local].copy_(full[piece])


def model_signature(m: ModelConfig) -> dict:
    """What a checkpoint's tensors depend on; a resume with a different signature is refused."""
    return {
        "vocab_size": m.vocab_size, "num_layers": m.num_layers, "hidden_size": m.hidden_size,
        "num_attention_heads": m.num_attention_heads, "num_query_groups": m.query_groups,
        "head_dim": m.head_size, "qk_norm": m.qk_norm,
        "rope_scaling": dataclasses.asdict(m.rope_scaling) if m.rope_scaling.type is not None else None,
        "ffn_hidden_size": m.ffn_size, "activation": m.activation, "norm": m.norm,
        "tie_embeddings": m.tie_embeddings, "gpas": m.gpas.enabled,
        "moe": None if m.moe.num_experts is None else {
            "num_experts": m.moe.num_experts, "ffn_hidden_size": m.moe.ffn_hidden_size or m.ffn_size,
            "layer_freq": m.moe.layer_freq, "shared_expert_ffn_hidden_size": m.moe.shared_expert_ffn_hidden_size,
            "expert_bias": m.moe.router.expert_bias_update_rate > 0,
        },
    }


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    return ceil_to(tokenizer_vocab, multiple)
