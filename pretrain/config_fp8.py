"""The validation of `precision.fp8` (the section is in pretrain/config.py; the model converter in
pretrain/model/fp8.py): every line names the field and the fix. Apart from config.py because it is
one concept, the shapes FP8 kernels accept, and config.py is long enough."""

from __future__ import annotations

RECIPES = {"torch": ("tensorwise", "rowwise", "delayed"), "te": ("delayed", "tensorwise", "blockwise")}


def config_problems(cfg) -> list[str]:
    """What an FP8 config gets wrong, one line per problem naming the field and the fix (empty when FP8 is off)."""
    f, m = cfg.precision.fp8, cfg.model
    if not f.enabled:
        return []
    lines = []
    if cfg.precision.dtype != "bf16":
        lines.append(f"precision.fp8.enabled=true needs precision.dtype=bf16 (got {cfg.precision.dtype}): FP8 GEMMs "
                     "take their inputs from bf16 autocast and return bf16")
    if f.recipe not in RECIPES[f.backend]:
        lines.append(f"precision.fp8.recipe={f.recipe} is not a recipe of precision.fp8.backend={f.backend}: choose "
                     f"one of {', '.join(RECIPES[f.backend])}")
    if f.recipe == "rowwise" and f.format != "e4m3":
        lines.append("precision.fp8.recipe=rowwise scales gradients in e4m3 (torch's rowwise kernel takes no "
                     "e5m2): set precision.fp8.format=e4m3")
    if f.backend == "te" and cfg.model.recompute != "none":
        lines.append(f"precision.fp8.backend=te with model.recompute={cfg.model.recompute}: a recomputed layer runs "
                     "outside Transformer Engine's autocast, so its FP8 GEMMs would not recompute what the forward "
                     "computed; use precision.fp8.backend=torch, or model.recompute=none")
    if f.backend == "te" and cfg.train.compile:
        lines.append("precision.fp8.backend=te with train.compile=true: TE's modules are a graph break and its "
                     "delayed-scaling autocast raises inside compiled code; use precision.fp8.backend=torch "
                     "(compiled with the layers), or train.compile=false")
    if f.amax_history_len < 1:
        lines.append(f"precision.fp8.amax_history_len={f.amax_history_len}: must be at least 1")
    if f.margin < 0:
        lines.append(f"precision.fp8.margin={f.margin}: must be zero or positive")
    for name in ("bf16_first_layers", "bf16_last_layers", "min_weight_elements"):
        if getattr(f, name) < 0:
            lines.append(f"precision.fp8.{name}={getattr(f, name)}: must be zero or positive")
    if f.bf16_first_layers + f.bf16_last_layers >= m.num_layers:
        lines.append(f"precision.fp8.bf16_first_layers + bf16_last_layers = {f.bf16_first_layers + f.bf16_last_layers}"
                     f" keeps all {m.num_layers} layers in bf16: lower them, or set precision.fp8.enabled=false")
    if lines:
        return lines
    lines += _shape_problems(cfg)
    return lines


def _shape_problems(cfg) -> list[str]:
    """The CUDA kernel multiplies dimensions that are multiples of 16: each FP8 GEMM's per-rank weight, and for
    the weight gradient of a dense layer (tensorwise, delayed: contracted over the tokens) the tokens of a
    micro-batch on one rank."""
    f, m, p, t = cfg.precision.fp8, cfg.model, cfg.parallel, cfg.train
    tp, head = p.tensor, m.head_size
    qkv = (m.num_attention_heads + 2 * m.query_groups) * head
    weights = {  # name: (global [out, in], which dim is split over TP, what to change)
        "attention.qkv": ((qkv, m.hidden_size), 0, "model.hidden_size / head_dim / num_query_groups"),
        "attention.out": ((m.hidden_size, m.num_attention_heads * head), 1, "model.hidden_size / head_dim"),
    }
    if not all(m.moe.is_moe_layer(i) for i in range(m.num_layers)):  # some layer has a dense MLP
        weights["mlp.up (and gate)"] = ((m.ffn_size, m.hidden_size), 0, "model.ffn_hidden_size")
        weights["mlp.down"] = ((m.hidden_size, m.ffn_size), 1, "model.ffn_hidden_size")
    if m.moe.shared_expert_ffn_hidden_size:
        shared = m.moe.shared_expert_ffn_hidden_size
        weights["mlp.shared.up"] = ((shared, m.hidden_size), 0, "model.moe.shared_expert_ffn_hidden_size")
        weights["mlp.shared.down"] = ((m.hidden_size, shared), 1, "model.moe.shared_expert_ffn_hidden_size")
    lines = []
    for name, ((out, inp), split, fix) in weights.items():
        if out * inp < f.min_weight_elements:
            continue
        local = [out // tp if split == 0 else out, inp // tp if split == 1 else inp]
        if any(d % 16 for d in local):
            lines.append(f"precision.fp8: the weight of layers.*.{name} is {local} per rank (global [{out}, {inp}], "
                         f"parallel.tensor={tp}): FP8 GEMMs need both dimensions multiples of 16; change {fix}, or "
                         f"keep it in bf16 with precision.fp8.min_weight_elements > {out * inp}")
    tokens = t.micro_batch_size * m.seq_length // p.context
    if f.recipe in ("tensorwise", "delayed") and tokens % 16:
        lines.append(f"precision.fp8: a micro-batch holds train.micro_batch_size x model.seq_length / "
                     f"parallel.context = {tokens} tokens per rank, and the FP8 weight gradient contracts over them: "
                     "make it a multiple of 16")
    return lines
