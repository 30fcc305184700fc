"""Hugging Face <-> foldtron: parameter names, tensor layouts, and config.json <-> the model config.

Four architectures, as their checkpoints name tensors on disk (transformers v5 fuses experts in memory, but
`save_pretrained` writes these names back, and hub files have them):

    HF (model.layers.i.)                           foldtron (layers.i.)
    model.embed_tokens.weight [V, H]               embedding.weight [V padded, H]
    input_layernorm / post_attention_layernorm     attn_norm / mlp_norm
    self_attn.{q,k,v}_proj.weight                  attention.qkv.weight (fused: see below)
    self_attn.o_proj.weight                        attention.out.weight
    self_attn.{q,k}_norm.weight [d]                attention.{q,k}_norm.weight   (Qwen3, Qwen3-MoE)
    mlp.{gate,up,down}_proj.weight                 mlp.{gate,up,down}.weight     (dense layers)
    block_sparse_moe.gate.weight [E, H]            mlp.router.weight             (Mixtral; Qwen3-MoE: mlp.gate)
    block_sparse_moe.experts.N.w1 / w3 [F, H]      mlp.experts.gate / up [E, F, H], expert N at N
    block_sparse_moe.experts.N.w2 [H, F]           mlp.experts.down [E, H, F]   (Qwen3-MoE: mlp.experts.N.*_proj)
    model.norm.weight, lm_head.weight [V, H]       final_norm.weight, output.weight (absent when tied)

The fused query/key/value weight is laid out query group by query group, each group's queries, then its key,
then its value ([q_g (heads per group x d rows); k_g (d); v_g (d)] for g = 0..G-1, Megatron's `linear_qkv`), so
that tensor parallelism splits it into whole groups; HF keeps q, k and v apart, heads in the same order
(`repeat_kv` gives query head h the key/value head h // heads per group, as our grouped attention does).

Routing: Mixtral and Qwen3-MoE (with `norm_topk_prob: true`) take a softmax over all experts, keep the top k and
renormalise them, which is exactly a softmax over the top-k logits: foldtron's default router (`score: softmax`,
`pre_softmax: false`). Qwen3-MoE with `norm_topk_prob: false` keeps the top-k of the full softmax as they are:
`pre_softmax: true`. Everything else a config.json may ask for and foldtron cannot compute is refused by name.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from parallel.errors import FoldtronError
from pretrain.config import ModelConfig, ceil_to


class ConversionError(FoldtronError, ValueError):
    """A model, checkpoint or folder that cannot be converted; the message names what and why."""


COPY, VOCAB, QKV, EXPERTS = "copy", "vocab", "qkv", "experts"


@dataclass(frozen=True)
class Architecture:
    """What a transformers architecture looks like on disk: `moe` is the MoE block's module name and the names of
    its experts' gate, up and down weights (None: a dense model)."""
    name: str
    model_type: str
    qk_norm: bool
    moe: Optional[tuple[str, tuple[str, str, str]]] = None


ARCHITECTURES = {a.name: a for a in (
    Architecture("LlamaForCausalLM", "llama", qk_norm=False),
    Architecture("Qwen3ForCausalLM", "qwen3", qk_norm=True),
    Architecture("MixtralForCausalLM", "mixtral", qk_norm=False, moe=("block_sparse_moe", ("w1", "w3", "w2"))),
    Architecture("Qwen3MoeForCausalLM", "qwen3_moe", qk_norm=True, moe=("mlp", ("gate_proj", "up_proj", "down_proj"))),
)}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved; recomputed, not weights


@dataclass(frozen=True)
class Mapping:
    """One foldtron tensor and the HF tensors it is made of (in order), and how (`kind`)."""
    ours: str
    theirs: tuple[str, ...]
    kind: str = COPY


def tensor_map(arch: Architecture, m: ModelConfig) -> list[Mapping]:
    """Every foldtron weight of the model `m` and the HF weights of architecture `arch` it holds."""
    out = [Mapping("embedding.weight", ("model.embed_tokens.weight",), VOCAB)]
    for i in range(m.num_layers):
        ours, theirs = f"layers.{i}.", f"model.layers.{i}."
        out += [Mapping(ours + "attn_norm.weight", (theirs + "input_layernorm.weight",)),
                Mapping(ours + "attention.qkv.weight",
                        tuple(f"{theirs}self_attn.{x}_proj.weight" for x in "qkv"), QKV),
                Mapping(ours + "attention.out.weight", (theirs + "self_attn.o_proj.weight",))]
        if m.qk_norm:
            out += [Mapping(f"{ours}attention.{x}_norm.weight", (f"{theirs}self_attn.{x}_norm.weight",)) for x in "qk"]
        out.append(Mapping(ours + "mlp_norm.weight", (theirs + "post_attention_layernorm.weight",)))
        if m.moe.is_moe_layer(i):
            block, names = arch.moe
            out.append(Mapping(ours + "mlp.router.weight", (f"{theirs}{block}.gate.weight",)))
            for part, name in zip(("gate", "up", "down"), names):
                experts = tuple(f"{theirs}{block}.experts.{e}.{name}.weight" for e in range(m.moe.num_experts))
                out.append(Mapping(f"{ours}mlp.experts.{part}", experts, EXPERTS))
        else:
            out += [Mapping(f"{ours}mlp.{x}.weight", (f"{theirs}mlp.{x}_proj.weight",)) for x in ("gate", "up", "down")]
    out.append(Mapping("final_norm.weight", ("model.norm.weight",)))
    if not m.tie_embeddings:
        out.append(Mapping("output.weight", ("lm_head.weight",), VOCAB))
    return out


def hf_shapes(mapping: Mapping, ours_shape: tuple[int, ...], m: ModelConfig, hf_vocab: int) -> list[tuple[int, ...]]:
    """The shapes of the HF tensors of `mapping`, from the foldtron tensor's (global) shape."""
    if mapping.kind == VOCAB:
        return [(hf_vocab, *ours_shape[1:])]
    if mapping.kind == QKV:
        d, hidden = m.head_size, m.hidden_size
        return [(m.num_attention_heads * d, hidden), (m.query_groups * d, hidden), (m.query_groups * d, hidden)]
    if mapping.kind == EXPERTS:
        return [tuple(ours_shape[1:])] * ours_shape[0]
    return [tuple(ours_shape)]


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, groups: int, head_dim: int) -> torch.Tensor:
    """HF's q [heads x d, H], k and v [groups x d, H] -> our fused weight, query group by query group."""
    hidden = q.shape[-1]
    q, k, v = q.view(groups, -1, hidden), k.view(groups, head_dim, hidden), v.view(groups, head_dim, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)  # [groups x (heads per group + 2) x d, H]


def split_qkv(qkv: torch.Tensor, *, heads: int, groups: int, head_dim: int) -> list[torch.Tensor]:
    """The inverse of `fuse_qkv`: [q, k, v]."""
    hidden = qkv.shape[-1]
    queries = heads // groups * head_dim
    grouped = qkv.view(groups, queries + 2 * head_dim, hidden)
    q, k, v = grouped.split([queries, head_dim, head_dim], dim=1)
    return [t.reshape(-1, hidden) for t in (q, k, v)]


def to_ours(mapping: Mapping, tensors: list[torch.Tensor], m: ModelConfig, *, vocab_size: int) -> torch.Tensor:
    """The foldtron tensor made of the HF `tensors` of `mapping` (the vocabulary padded to `vocab_size` with zero
    rows)."""
    if mapping.kind == VOCAB:
        (t,) = tensors
        return torch.cat([t, t.new_zeros(vocab_size - t.shape[0], *t.shape[1:])]) if vocab_size > t.shape[0] else t
    if mapping.kind == QKV:
        return fuse_qkv(*tensors, groups=m.query_groups, head_dim=m.head_size)
    if mapping.kind == EXPERTS:
        return torch.stack(tensors)
    (t,) = tensors
    return t


def to_theirs(mapping: Mapping, tensor: torch.Tensor, m: ModelConfig, *, hf_vocab: int) -> list[torch.Tensor]:
    """The HF tensors of `mapping` made of the foldtron `tensor` (the vocabulary trimmed to `hf_vocab`); views."""
    if mapping.kind == VOCAB:
        return [tensor[:hf_vocab]]
    if mapping.kind == QKV:
        return split_qkv(tensor, heads=m.num_attention_heads, groups=m.query_groups, head_dim=m.head_size)
    if mapping.kind == EXPERTS:
        return list(tensor.unbind(0))
    return [tensor]


# ----------------------------------------------------------------------------- config.json -> foldtron


def architecture_of(hf: dict) -> Architecture:
    names = hf.get("architectures") or []
    known = [ARCHITECTURES[n] for n in names if n in ARCHITECTURES]
    if len(names) != 1 or not known:
        raise ConversionError(f"config.json: architectures={names}: foldtron converts one of "
                              f"{', '.join(ARCHITECTURES)}")
    return known[0]


def rope_of(hf: dict) -> tuple[float, Optional[dict]]:
    """(rope_theta, the rope scaling dict or None) from either format: transformers v4 (`rope_theta`,
    `rope_scaling`) or v5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    scaling = {**scaling, **params}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return float(theta), None if kind in (None, "default") else {**scaling, "rope_type": kind}


def model_section(hf: dict, *, vocab_multiple: int = 128, seq_length: Optional[int] = None) -> dict:
    """The foldtron `model` section (a dict, as in a config.yaml) of a HF config.json; every field foldtron cannot
    represent is refused, all of them named in one ConversionError."""
    arch = architecture_of(hf)
    problems: list[str] = []

    def refuse(field: str, value, why: str) -> None:
        problems.append(f"{field}={value!r} ({why})")

    get = hf.get
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    for name in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(get(name), int) or get(name) <= 0:
            refuse(name, get(name), "a positive integer is needed")
    if problems:
        raise ConversionError("config.json: cannot convert: " + "; ".join(problems))
    if get("hidden_act", "silu") != "silu":
        refuse("hidden_act", get("hidden_act"), "foldtron's MLP is SwiGLU, silu only")
    for name in ("attention_bias", "mlp_bias"):
        if get(name):
            refuse(name, get(name), "foldtron's linear layers have no biases")
    if arch.model_type in ("qwen3", "qwen3_moe"):
        if get("use_sliding_window"):
            refuse("use_sliding_window", True, "foldtron's attention is full causal attention")
        if any(t != "full_attention" for t in get("layer_types") or []):
            refuse("layer_types", get("layer_types"), "foldtron's attention is full causal attention")
    elif get("sliding_window") is not None:
        refuse("sliding_window", get("sliding_window"), "foldtron's attention is full causal attention")
    theta, scaling = rope_of(hf)
    rope_scaling = {}
    if scaling is not None:
        if scaling["rope_type"] != "llama3":
            refuse("rope_scaling.rope_type", scaling["rope_type"], "foldtron implements llama3 rope scaling only")
        else:
            keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            for key in keys:
                if key not in scaling:
                    refuse(f"rope_scaling.{key}", None, "llama3 rope scaling needs it (transformers does too)")
            rope_scaling = {"type": "llama3", **{k: scaling[k] for k in keys if k in scaling}}
    partial = (get("rope_parameters") or {}).get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        refuse("partial_rotary_factor", partial, "foldtron rotates the whole head")
    head_dim = get("head_dim") or hidden // heads
    section = {
        "num_layers": get("num_hidden_layers"), "hidden_size": hidden, "num_attention_heads": heads,
        "num_query_groups": get("num_key_value_heads") or heads, "head_dim": head_dim, "qk_norm": arch.qk_norm,
        "ffn_hidden_size": get("intermediate_size"), "vocab_size": ceil_to(get("vocab_size"), vocab_multiple),
        "vocab_multiple": vocab_multiple, "norm": "rmsnorm", "norm_eps": float(get("rms_norm_eps", 1e-6)),
        "activation": "swiglu", "rope_theta": theta, "tie_embeddings": bool(get("tie_word_embeddings", False)),
        "max_position_embeddings": get("max_position_embeddings"),
        "seq_length": seq_length or min(get("max_position_embeddings") or 4096, 4096),
    }
    if rope_scaling:
        section["rope_scaling"] = rope_scaling
    if "initializer_range" in hf:
        section["init_std"] = float(get("initializer_range"))
    if arch.moe is not None:
        section["moe"] = _moe_section(arch, hf, refuse)
        if section["moe"] is None:
            del section["moe"]
    if problems:
        raise ConversionError(f"config.json ({arch.name}): cannot convert: " + "; ".join(problems))
    return section


def _moe_section(arch: Architecture, hf: dict, refuse) -> Optional[dict]:
    """model.moe of a Mixtral or Qwen3-MoE config.json (None: a Qwen3-MoE whose layers are all dense)."""
    get = hf.get
    experts = get("num_local_experts") or get("num_experts")
    top_k = get("num_experts_per_tok")
    if not isinstance(experts, int) or experts < 1 or not isinstance(top_k, int) or not 1 <= top_k <= experts:
        refuse("num_local_experts / num_experts_per_tok", (experts, top_k), "needs 1 <= top-k <= experts")
        return None
    # the balancing loss's weight, as Megatron-Bridge maps it (HF's switch loss spans all layers at once and has
    # no 1/top-k, ours is per layer: the same coefficient is the conventional choice, not the same gradient)
    moe = {"num_experts": experts, "top_k": top_k,
           "router": {"aux_loss_coeff": float(get("router_aux_loss_coef", 0.01) or 0.0)}}
    if arch.model_type == "mixtral":
        moe["ffn_hidden_size"] = get("intermediate_size")
        return moe
    moe["ffn_hidden_size"] = get("moe_intermediate_size")
    if not get("norm_topk_prob", False):  # the top-k of the softmax over all experts, not renormalised
        moe["router"]["pre_softmax"] = True
    elif top_k == 1:
        refuse("norm_topk_prob", True, "with num_experts_per_tok=1 it gives every token the weight 1, and the "
               "router no gradient; foldtron refuses that router")
    step, dense = get("decoder_sparse_step", 1) or 1, set(get("mlp_only_layers") or [])
    layers = [int(i not in dense and (i + 1) % step == 0) for i in range(get("num_hidden_layers"))]
    if not any(layers):
        return None
    if not all(layers):
        moe["layer_freq"] = layers
    return moe


# ----------------------------------------------------------------------------- foldtron -> config.json


def export_architecture(m: ModelConfig) -> Architecture:
    """The HF architecture that computes what the foldtron model `m` computes; what none can is refused by name."""
    problems = []
    if m.activation != "swiglu":
        problems.append(f"model.activation={m.activation} (HF's Llama family is SwiGLU)")
    if m.norm != "rmsnorm":
        problems.append(f"model.norm={m.norm} (HF's Llama family uses RMSNorm)")
    if m.gpas.enabled:
        problems.append("model.gpas.enabled=true (no HF architecture scales activations with GPAS gates)")
    moe, router = m.moe, m.moe.router
    if moe.num_experts is not None:
        if moe.shared_expert_ffn_hidden_size:
            problems.append("model.moe.shared_expert_ffn_hidden_size (Mixtral and Qwen3-MoE have no shared expert)")
        if router.score != "softmax":
            problems.append(f"model.moe.router.score={router.score} (Mixtral and Qwen3-MoE route by softmax)")
        if router.num_groups:
            problems.append("model.moe.router.num_groups (no group-limited routing in Mixtral or Qwen3-MoE)")
        if router.expert_bias_update_rate > 0:
            problems.append("model.moe.router.expert_bias_update_rate > 0 (no expert bias in Mixtral or Qwen3-MoE)")
        if moe.capacity_factor is not None:
            problems.append(f"model.moe.capacity_factor={moe.capacity_factor} (foldtron drops tokens over capacity, "
                            "also in evaluation; Mixtral and Qwen3-MoE are dropless, so their outputs would differ)")
        if not m.qk_norm:
            dense = [i for i in range(m.num_layers) if not moe.is_moe_layer(i)]
            if dense:
                problems.append(f"dense layers {dense} in an MoE model without model.qk_norm (Mixtral has only MoE "
                                "layers; Qwen3-MoE, which may have dense ones, needs model.qk_norm=true)")
            if router.pre_softmax:
                problems.append("model.moe.router.pre_softmax=true without model.qk_norm (Mixtral renormalises the "
                                "top-k; Qwen3-MoE, norm_topk_prob=false, needs model.qk_norm=true)")
    if problems:
        raise ConversionError("no Hugging Face architecture computes this model: " + "; ".join(problems))
    name = {(False, False): "LlamaForCausalLM", (True, False): "Qwen3ForCausalLM",
            (False, True): "MixtralForCausalLM", (True, True): "Qwen3MoeForCausalLM"}[
        (m.qk_norm, moe.num_experts is not None)]
    return ARCHITECTURES[name]


def hf_config(m: ModelConfig, *, vocab_size: int, dtype: torch.dtype, base: Optional[dict] = None) -> dict:
    """The config.json of the foldtron model `m` (resolved), with `vocab_size` rows; `base`: the config.json it
    was imported from, whose other fields (token ids, ...) are kept where the architecture is the same."""
    arch = export_architecture(m)
    out = dict(base) if base and architecture_of(base).name == arch.name else {}
    for stale in ("rope_parameters", "rope_scaling", "torch_dtype", "dtype", "transformers_version"):
        out.pop(stale, None)
    r = m.rope_scaling
    out.update({
        "architectures": [arch.name], "model_type": arch.model_type, "vocab_size": vocab_size,
        "hidden_size": m.hidden_size, "intermediate_size": m.ffn_size, "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads, "num_key_value_heads": m.query_groups, "head_dim": m.head_size,
        "hidden_act": "silu", "max_position_embeddings": max(m.max_position_embeddings or 0, m.seq_length),
        "rms_norm_eps": m.norm_eps, "rope_theta": m.rope_theta,
        "rope_scaling": None if r.type is None else {"rope_type": r.type, **{
            k: v for k, v in dataclasses.asdict(r).items() if k != "type"}},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "initializer_range": m.init_std,
        "torch_dtype": str(dtype).removeprefix("torch."),
    })
    if arch.model_type == "llama":
        out["mlp_bias"] = False
    if arch.model_type in ("qwen3", "qwen3_moe"):
        out.update({"use_sliding_window": False, "sliding_window": None, "max_window_layers": m.num_layers})
    elif arch.model_type == "mixtral":
        out["sliding_window"] = None
    if m.moe.num_experts is not None:
        moe = m.moe
        out.update({"num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.router.aux_loss_coeff,
                    "output_router_logits": False})
        if arch.model_type == "mixtral":
            out.update({"num_local_experts": moe.num_experts, "intermediate_size": moe.ffn_hidden_size or m.ffn_size,
                        "router_jitter_noise": 0.0})
        else:
            out.pop("num_local_experts", None)
            out.update({"num_experts": moe.num_experts, "moe_intermediate_size": moe.ffn_hidden_size or m.ffn_size,
                        "norm_topk_prob": not moe.router.pre_softmax, "decoder_sparse_step": 1,
                        "mlp_only_layers": [i for i in range(m.num_layers) if not moe.is_moe_layer(i)]})
    return out
