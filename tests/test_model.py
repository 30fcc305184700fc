import math

import torch
import torch.nn.functional as F

from parallel.placement import Placement, split
from parallel.topology import Topology
from pretrain.config import ModelConfig
from pretrain.config_loading import load_config
from pretrain.model import GPT
from pretrain.model.gpas import GPASFeature, GPASGate
from pretrain.model.gpt import apply_rotary, rotary_cos_sin

VOCAB = 64


def small(**kw) -> ModelConfig:
    args = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.seq_length=16"]
    args += [f"model.{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in kw.items() if not isinstance(v, dict)]
    cfg = load_config(None, args)
    for k, v in kw.items():
        if isinstance(v, dict):
            for kk, vv in v.items():
                setattr(getattr(cfg.model, k), kk, vv)
    return cfg.model


def gpas_scales(model: GPT) -> dict[str, float]:
    (feature,) = [f for f in model.features() if isinstance(f, GPASFeature)]
    return feature.local_scales()


def build(cfg: ModelConfig, seed: int = 0) -> GPT:
    model = GPT(cfg, VOCAB, Topology.single())
    model.init_parameters(seed)
    return model


def test_causal_future_tokens_never_change_earlier_logits():
    model = build(small(num_query_groups=2))
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    changed = ids.clone()
    changed[:, 9:] = (changed[:, 9:] + 7) % VOCAB
    a, b = model(ids), model(changed)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


def test_grouped_query_attention_shapes():
    cfg = small(num_query_groups=2)
    model = build(cfg)
    head_dim = 32 // 4
    assert model.layers["0"].attention.qkv.weight.shape == ((4 + 2 * 2) * head_dim, 32)
    assert model.layers["0"].attention.out.weight.shape == (32, 32)
    assert model(torch.zeros(3, 16, dtype=torch.long)).shape == (3, 16, VOCAB)


def test_query_head_h_attends_with_key_value_group_h_over_heads_per_group():
    """A reference written head by head from the weight rows: query head h of group g = h // 2 uses the
    rows [g*4*d + (h%2)*d, ...) of the fused weight; its group's key and value rows follow the group's queries."""
    model = build(small(num_query_groups=2))
    attn = model.layers["0"].attention
    d, hpg = 8, 2
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(16).expand(2, 16)
    from pretrain.model.gpt import apply_rotary, rotary_cos_sin

    cos, sin = rotary_cos_sin(pos, d, 10000.0)
    w = attn.qkv.weight
    outputs = []
    for h in range(4):
        g = h // hpg
        base = g * (hpg + 2) * d
        q = x @ w[base + (h % hpg) * d : base + (h % hpg + 1) * d].T
        k = x @ w[base + hpg * d : base + (hpg + 1) * d].T
        v = x @ w[base + (hpg + 1) * d : base + (hpg + 2) * d].T
        q, k = apply_rotary(q[:, None], cos, sin)[:, 0], apply_rotary(k[:, None], cos, sin)[:, 0]
        scores = (q @ k.transpose(1, 2)) / d**0.5
        scores = scores.masked_fill(torch.ones(16, 16, dtype=torch.bool).triu(1), float("-inf"))
        outputs.append(scores.softmax(-1) @ v)
    expected = attn.out(torch.cat(outputs, dim=-1))
    torch.testing.assert_close(attn(x, cos, sin, pos), expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- rotary embeddings


def rotate_by_hand(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [batch, heads, seq, d] at positions [batch, seq], rotated in fp64 without the module's code: pair j is
    (x[j], x[j + d/2]) ("rotate half"), read as the complex number x[j] + i x[j + d/2] and multiplied by
    exp(i * position * theta^(-2j/d))."""
    d = x.shape[-1]
    frequencies = theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angles = positions.double()[:, None, :, None] * frequencies
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """The module's rotary embedding of x [batch, heads, seq, d] at positions [batch, seq]."""
    return apply_rotary(x, *rotary_cos_sin(positions, x.shape[-1], theta))


def test_rotary_is_the_complex_rotation_of_half_split_pairs():
    """The module's cos/sin tables and its rotate-half product give exactly the textbook rotary embedding,
    at any positions (here random ones, as context parallelism gives) and for any base. The angles are fp32 in
    the module: up to 64 radians they are off by a few 1e-6 (observed at most 2.7e-6 here), so entries of size 1
    are off by as much (atol 1e-5)."""
    generator = torch.Generator().manual_seed(4)
    for theta in (10000.0, 500000.0):
        x = torch.randn(2, 3, 16, 16, generator=generator)
        positions = torch.randint(0, 64, (2, 16), generator=generator)
        expected = rotate_by_hand(x, positions, theta).float()
        torch.testing.assert_close(rotary(x, positions, theta), expected, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_the_relative_position():
    """Rotary attention is relative: a query at position m and a key at n score q.k as at m + o and n + o, for
    any shift o, while a different distance m - n scores differently. Scores here are up to ~10; fp32 angles up
    to 48 radians make them differ by a few 1e-6 (observed at most 2e-6), hence atol 1e-5."""
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(1, 4, 1, 16, generator=generator).expand(1, 4, 32, 16)  # one query and one key per head,
    k = torch.randn(1, 4, 1, 16, generator=generator).expand(1, 4, 32, 16)  # placed at 32 position pairs (m, n)
    m, n = torch.randint(0, 24, (2, 1, 32), generator=generator)

    def scores(query_positions, key_positions):
        return (rotary(q, query_positions) * rotary(k, key_positions)).sum(-1)

    base = scores(m, n)
    for shift in (1, 5, 24):
        torch.testing.assert_close(scores(m + shift, n + shift), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scores(m - n + 24, torch.full_like(n, 24)), base, rtol=1e-5, atol=1e-5)
    assert (scores(m, n + 1) - base).abs().max() > 0.1  # the distance matters
    # at distance 0 the rotations cancel: the score of the unrotated vectors
    torch.testing.assert_close(scores(m, m), (q * k).sum(-1), rtol=1e-5, atol=1e-5)


def test_rotary_keeps_norms_and_is_the_identity_at_position_zero():
    """A rotation of every pair keeps each head vector's length, at any position (here up to 4096); fp32 keeps
    cos^2 + sin^2 = 1 to ~1e-7 (observed at most 1.5e-7 relative), hence 1e-6. Position 0 changes nothing."""
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 32, 16, generator=generator)
    rotated = rotary(x, torch.randint(0, 4096, (2, 32), generator=generator))
    torch.testing.assert_close(rotated.norm(dim=-1), x.norm(dim=-1), rtol=1e-6, atol=0.0)
    assert not torch.allclose(rotated, x)
    assert torch.equal(rotary(x, torch.zeros(2, 32, dtype=torch.long)), x)


def test_tied_embeddings_share_the_table():
    tied, untied = build(small(tie_embeddings=True)), build(small())
    assert tied.output is None
    assert untied.num_parameters() - tied.num_parameters() == VOCAB * 32
    ids = torch.randint(0, VOCAB, (1, 16))
    tied(ids).sum().backward()
    assert tied.embedding.weight.grad is not None and tied.embedding.weight.grad.abs().sum() > 0


def test_same_seed_same_model_and_different_seed_differs():
    a, b, c = build(small(), 5), build(small(), 5), build(small(), 6)
    for (name, p), q, r in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(p, q), name
        if p.ndim == 2:
            assert not torch.equal(p, r), name


def test_scaled_init_of_output_projections():
    model = build(small(num_layers=8, hidden_size=256, num_attention_heads=4))
    std = model.layers["0"].mlp.down.weight.std().item()
    assert math.isclose(std, 0.02 / math.sqrt(16), rel_tol=0.05)
    assert math.isclose(model.layers["0"].mlp.up.weight.std().item(), 0.02, rel_tol=0.05)


def test_layernorm_and_gelu_options():
    model = build(small(norm="layernorm", activation="gelu"))
    assert model.layers["0"].attn_norm.bias is not None
    assert model.layers["0"].mlp.up.weight.shape == (4 * 32, 32)
    assert torch.isfinite(model(torch.zeros(1, 16, dtype=torch.long))).all()


def test_placement_pieces_split_along_the_partition_dimension():
    full = torch.arange(12.0).view(4, 3)

    def piece(dim, rank, size):
        return full[Placement((4, 3), split(dim, "tp", rank=rank, size=size)).local_slices()]

    assert torch.equal(torch.cat([piece(0, r, 2) for r in range(2)]), full)
    assert torch.equal(torch.cat([piece(1, r, 3) for r in range(3)], dim=1), full)
    assert torch.equal(piece(0, 0, 1), full)  # a group of one rank: the whole tensor


# ---------------------------------------------------------------- GPAS


def test_gpas_fresh_gates_give_exactly_the_model_without_gpas():
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    plain, gated = build(small()), build(small(gpas={"enabled": True}))
    assert gpas_scales(gated) == {"0": 1.0, "1": 1.0}
    assert torch.equal(plain(ids), gated(ids))


def test_gpas_forward_value_is_scaled():
    gate = GPASGate(sequence_parallel=False)
    with torch.no_grad():
        gate.gate.fill_(0.7)
    x = torch.randn(4, 5)
    torch.testing.assert_close(gate(x), (1 - F.silu(torch.tensor(0.7))) * x)
    assert math.isclose(gate.scale(), 1 - 0.7 * torch.sigmoid(torch.tensor(0.7)).item(), rel_tol=1e-6)


def test_gpas_gradient_into_activations_is_unchanged():
    gate = GPASGate(sequence_parallel=False)
    with torch.no_grad():
        gate.gate.fill_(1.3)
    x = torch.randn(4, 5, requires_grad=True)
    g = torch.randn(4, 5)
    gate(x).backward(g)
    torch.testing.assert_close(x.grad, g)  # identity, despite the forward scaling
    a = torch.tensor(1.3)
    dsilu = torch.sigmoid(a) * (1 + a * (1 - torch.sigmoid(a)))
    torch.testing.assert_close(gate.gate.grad, -dsilu * (g * x.detach()).sum())


def test_gpas_gates_scale_both_residual_sites_of_a_layer():
    model = build(small(gpas={"enabled": True}))
    layer = model.layers["0"]
    with torch.no_grad():
        layer.gpas.gate.fill_(2.0)
    scale = 1 - F.silu(torch.tensor(2.0))
    x = torch.randn(1, 16, 32)
    from pretrain.model.gpt import rotary_cos_sin

    pos = torch.arange(16).expand(1, 16)
    cos, sin = rotary_cos_sin(pos, 8, 10000.0)
    h = (x + layer.attention(layer.attn_norm(x), cos, sin, pos)) * scale
    expected = (h + layer.mlp(layer.mlp_norm(h))) * scale
    torch.testing.assert_close(layer(x, cos, sin, pos), expected, rtol=1e-5, atol=1e-6)
    assert gpas_scales(model)["0"] < 1.0 and gpas_scales(model)["1"] == 1.0
