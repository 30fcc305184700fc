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

import math
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

from parallel import context_parallel
from parallel.tensor_parallel import (
    ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding, enter_tensor_parallel, init_normal_, take_shard,
)
from parallel.topology import Topology
from pretrain.config import ModelConfig, ceil_to
from pretrain.model.gpas import GPASGate
from pretrain.model.moe import MoE


def mark_sequence_parallel(module: nn.Module, topology: Topology) -> None:
    """Under sequence parallelism these replicated weights see only this rank's tokens: their gradients
    are summed over TP by the gradient synchronisation."""
    for param in module.parameters():
        param.sequence_parallel = topology.sequence_parallel


class Norm(nn.Module):
    """RMSNorm or LayerNorm over the hidden dimension."""

    def __init__(self, size: int, kind: str, eps: float, topology: Topology):
        super().__init__()
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if kind == "layernorm" else None
        mark_sequence_parallel(self, topology)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "rmsnorm":
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of shape [batch, 1, seq, head_dim] for the given (global) positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # [b, s, d/2]
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, topology: Topology):
        super().__init__()
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.local_groups = cfg.query_groups // topology.tp
        self.heads_per_group = cfg.num_attention_heads // cfg.query_groups
        qkv_size = (cfg.num_attention_heads + 2 * cfg.query_groups) * self.head_dim
        self.cp_group = topology.cp_group
        sp = topology.sequence_parallel
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_size, topology, sp)
        self.out = RowParallelLinear(cfg.num_attention_heads * self.head_dim, cfg.hidden_size, topology, sp)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv(x)  # [b, s, local heads and groups]: the whole local sequence, also under SP
        b, s, _ = qkv.shape
        qkv = qkv.view(b, s, self.local_groups, self.heads_per_group + 2, self.head_dim)
        q = qkv[:, :, :, : self.heads_per_group].reshape(b, s, -1, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, -2].transpose(1, 2)
        v = qkv[:, :, :, -1].transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = context_parallel.attention(q, k, v, positions, self.cp_group, enable_gqa=self.heads_per_group > 1)
        return self.out(y.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, topology: Topology, ffn_size: int | None = None):
        super().__init__()
        sp, ffn = topology.sequence_parallel, ffn_size or cfg.ffn_size
        self.gate = ColumnParallelLinear(cfg.hidden_size, ffn, topology, sp) if cfg.activation == "swiglu" else None
        self.up = ColumnParallelLinear(cfg.hidden_size, ffn, topology, sp)
        self.down = RowParallelLinear(ffn, cfg.hidden_size, topology, sp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = enter_tensor_parallel(x, self.up.topology, self.up.sequence_parallel)  # once for gate and up
        if self.gate is not None:
            h = F.silu(self.gate(x, entered=True)) * self.up(x, entered=True)
        else:
            h = F.gelu(self.up(x, entered=True), approximate="tanh")
        return self.down(h)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, topology: Topology, number: int):
        super().__init__()
        self.attn_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, topology)
        self.attention = Attention(cfg, topology)
        self.mlp_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, topology)
        if cfg.moe.is_moe_layer(number):
            shared = cfg.moe.shared_expert_ffn_hidden_size
            self.mlp = MoE(cfg, topology, MLP(cfg, topology, shared) if shared else None)
        else:
            self.mlp = MLP(cfg, topology)
        self.gpas = GPASGate() if cfg.gpas.enabled else None
        if self.gpas is not None:
            mark_sequence_parallel(self.gpas, topology)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attn_norm(x), cos, sin, positions)
        if self.gpas is not None:
            x = self.gpas(x)
        x = x + self.mlp(self.mlp_norm(x))
        if self.gpas is not None:
            x = self.gpas(x)
        return x


class GPT(nn.Module):
    """The model, or under pipeline parallelism one stage of it: `chunks` are the global numbers of the
    decoder layers of each of this stage's chunks (one chunk without interleaving). Parameter names keep
    the global numbers (`layers.7.mlp.up.weight` on any stage). The first chunk of the first stage
    embeds, the last chunk of the last stage normalises and projects to the vocabulary; with tied
    embeddings the last stage holds its own copy of the embedding table, kept equal through the
    embedding group."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, topology: Topology, chunks: list[range] | None = None):
        super().__init__()
        self.cfg, self.topology, self.vocab_size = cfg, topology, vocab_size
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.first, self.last = topology.is_first_stage, topology.is_last_stage
        sp = topology.sequence_parallel
        self.embedding = None
        if self.first or (self.last and cfg.tie_embeddings):
            self.embedding = VocabParallelEmbedding(vocab_size, cfg.hidden_size, topology, sp)
            self.embedding.weight.tied_embedding = cfg.tie_embeddings and topology.pp > 1
        self.chunks = [[str(i) for i in layers] for layers in (chunks or [range(cfg.num_layers)])]
        self.layers = nn.ModuleDict({i: TransformerLayer(cfg, topology, int(i)) for layers in self.chunks for i in layers})
        self.final_norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, topology) if self.last else None
        self.output = None
        if self.last and not cfg.tie_embeddings:
            self.output = ColumnParallelLinear(cfg.hidden_size, vocab_size, topology, sp)
        chunk_of = {i: c for c, layers in enumerate(self.chunks) for i in layers}
        for name, param in self.named_parameters():  # gradient buckets do not span chunks: each finishes on its own
            first_chunk = name.startswith("embedding.") and self.first
            param.pipeline_chunk = chunk_of[name.split(".")[1]] if name.startswith("layers.") else \
                0 if first_chunk else len(self.chunks) - 1

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, chunk: int = 0) -> torch.Tensor:
        """Runs one chunk of this stage. The first chunk of the first stage takes token ids [batch, seq],
        the others the previous chunk's hidden states. The last chunk of the last stage returns logits
        [batch, seq, vocab / TP] (this rank's vocabulary slice), the others hidden states.

        `positions` [batch, seq]: the global positions of the tokens (context parallelism holds
        chunks of each sequence); by default 0..seq-1 (first stage only)."""
        if positions is None:
            positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.cfg.rope_theta)
        if self.starts_model(chunk):
            x = self.embedding(x)
        for i in self.chunks[chunk]:
            x = self.layers[i](x, cos, sin, positions)
        if not self.ends_model(chunk):
            return x
        x = self.final_norm(x)
        if self.output is not None:
            return self.output(x)
        return F.linear(enter_tensor_parallel(x, self.topology, self.topology.sequence_parallel), self.embedding.weight)

    def routers(self) -> dict:
        """This stage's MoE routers by global layer number."""
        return {i: layer.mlp.router for i, layer in self.layers.items() if isinstance(layer.mlp, MoE)}

    def starts_model(self, chunk: int) -> bool:
        return self.first and chunk == 0

    def ends_model(self, chunk: int) -> bool:
        return self.last and chunk == len(self.chunks) - 1

    def gpas_scales(self) -> dict[str, float]:
        """1 - silu(a) of each of this stage's layers, by global layer number."""
        return {i: layer.gpas.scale() for i, layer in self.layers.items() if layer.gpas is not None}

    def num_parameters(self) -> int:
        """Parameters of the whole model (all shards), each counted once."""
        return sum(math.prod(getattr(p, "full_shape", p.shape)) for p in self.parameters())

    @torch.no_grad()
    def init_parameters(self, seed: int) -> None:
        """Draw every parameter from a generator keyed by (seed, name), then keep this rank's slice,
        so the same seed gives the same model whatever the parallel layout."""
        scaled_std = self.cfg.init_std / math.sqrt(2 * self.cfg.num_layers) if self.cfg.scaled_init else self.cfg.init_std
        tp_rank, tp_size = self.topology.tp_rank, self.topology.tp
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif name.endswith("bias") or name.endswith("gpas.gate"):
                param.zero_()
            else:
                std = scaled_std if name.endswith(("attention.out.weight", "down.weight", "experts.down")) \
                    else self.cfg.init_std
                if getattr(param, "expert", False):
                    self._init_experts(param, name, seed, std)
                else:
                    generator = torch.Generator().manual_seed(_name_seed(seed, name))
                    init_normal_(param, std, generator, tp_rank, tp_size)

    def _init_experts(self, param: nn.Parameter, name: str, seed: int, std: float) -> None:
        """Each expert from its own generator, keyed by its global number: any EP x ETP layout gets the same experts."""
        etp_rank, etp = self.topology.coords["etp"], self.topology.sizes.expert_tp
        dim = None if param.partition_dim is None else param.partition_dim - 1
        for local, expert in enumerate(param.experts):
            full = torch.empty(param.full_shape[1:]).normal_(0.0, std, generator=torch.Generator().manual_seed(
                _name_seed(seed, f"{name}.{expert}")))
            param[local].copy_(take_shard(full, dim, etp_rank, etp))


def _name_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def padded_vocab_size(tokenizer_vocab: int, multiple: int) -> int:
    return ceil_to(tokenizer_vocab, multiple)
