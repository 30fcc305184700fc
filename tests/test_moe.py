"""The router and the experts on one rank: routing rules, capacity, balancing losses and their gradients,
and the two expert implementations (a loop and a grouped matmul) against each other."""

import dataclasses

import pytest
import torch

from parallel.topology import Topology
from pretrain.config import ModelConfig
from pretrain.config_moe import MoEConfig, RouterConfig
from pretrain.model.moe import Experts
from pretrain.model.router import Router, expert_capacity

H, E = 16, 8


def make_router(**fields) -> Router:
    router_fields = {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(RouterConfig)}}
    moe_fields = {k: v for k, v in fields.items() if k not in router_fields}
    cfg = MoEConfig(num_experts=E, router=RouterConfig(**router_fields), **moe_fields)
    router = Router(cfg, H, Topology.single())
    torch.nn.init.normal_(router.weight, std=0.5, generator=torch.Generator().manual_seed(0))
    return router


def tokens(n=32, seed=1):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed))


def test_softmax_after_top_k_weights_each_token_by_its_k_logits():
    router = make_router(top_k=2)
    x = tokens()
    probs, routing_map = router(x, batch=1)
    logits = x @ router.weight.T
    assert (routing_map.sum(1) == 2).all()
    assert torch.equal(routing_map, torch.zeros_like(routing_map).scatter(1, logits.topk(2).indices, True))
    torch.testing.assert_close(probs.sum(1), torch.ones(32))
    expected = torch.softmax(logits.topk(2).values, dim=1)
    torch.testing.assert_close(probs[routing_map].view(32, 2).sort(1).values, expected.sort(1).values)


def test_pre_softmax_keeps_the_full_distribution_values():
    router = make_router(top_k=2, pre_softmax=True)
    x = tokens()
    probs, routing_map = router(x, batch=1)
    full = torch.softmax(x @ router.weight.T, dim=1)
    torch.testing.assert_close(probs[routing_map], full[routing_map])
    assert (probs.sum(1) < 1).all()


def test_sigmoid_bias_moves_the_choice_not_the_weights():
    router = make_router(top_k=2, score="sigmoid", expert_bias_update_rate=1e-3)
    x = tokens()
    router.expert_bias[3] = 100.0  # every token now picks expert 3
    probs, routing_map = router(x, batch=1)
    assert routing_map[:, 3].all()
    scores = torch.sigmoid(x @ router.weight.T)
    kept = scores * routing_map
    torch.testing.assert_close(probs, kept / kept.sum(1, keepdim=True))


def test_group_limited_routing_uses_only_the_best_groups():
    router = make_router(top_k=4, num_groups=4, group_top_k=2)
    x = tokens(64)
    _, routing_map = router(x, batch=1)
    groups_used = routing_map.view(64, 4, 2).any(-1).sum(1)
    assert (groups_used <= 2).all()
    logits = (x @ router.weight.T).view(64, 4, 2)
    best = logits.topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices  # each group's top-2 sum
    allowed = torch.zeros(64, 4, dtype=torch.bool).scatter(1, best, True)
    assert not (routing_map.view(64, 4, 2) & ~allowed[..., None]).any()


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("pad", [False, True])
def test_capacity_drops_by_policy_and_pads(policy, pad):
    router = make_router(top_k=2, capacity_factor=0.5, drop_policy=policy, pad_to_capacity=pad)
    x = tokens(64)
    probs, routing_map = router(x, batch=1)
    chosen_probs, chosen = router.top_k_routing(x @ router.weight.T)
    capacity = expert_capacity(64, 2, E, factor=0.5)
    assert capacity == 8
    per_expert = routing_map.sum(0)
    assert (per_expert == capacity).all() if pad else (per_expert <= capacity).all()
    kept = routing_map & chosen
    assert (probs[~kept] == 0).all() and torch.equal(probs[kept], chosen_probs[kept])
    for e in range(E):
        routed = chosen[:, e].nonzero().flatten()
        if len(routed) <= capacity:
            assert kept[routed, e].all()
            continue
        expected = routed[:capacity] if policy == "position" else \
            routed[chosen_probs[routed, e].topk(capacity).indices]
        assert set(kept[:, e].nonzero().flatten().tolist()) == set(expected.tolist())
    stats = router.stats
    assert stats["kept"] == kept.sum() and stats["routed"] == 128


def test_balancing_loss_is_one_for_uniform_scores_and_its_gradient_is_injected():
    """With equal logits every expert has probability 1/E and the loss (without its coefficient) is 1 however
    the tokens are routed. The loss's gradient reaches the router weights in backward, scaled, while the
    forward output is unchanged."""
    router = make_router(top_k=2, aux_loss_coeff=0.1)
    with torch.no_grad():
        router.weight.zero_()
    router(tokens(), batch=1)
    assert router.stats["aux"].item() == pytest.approx(1.0)

    router = make_router(top_k=2, aux_loss_coeff=0.1)
    router.loss_scale = 0.5
    x = tokens()
    probs, _ = router(x, batch=1)
    probs.sum().backward()  # d(sum probs)/d(logits) is 0 for softmax after top-k: only the loss's gradient is left
    with_aux = router.weight.grad.clone()
    router.weight.grad = None
    (router.load_balancing_loss(x @ router.weight.T, batch=1) * 0.5).backward()
    torch.testing.assert_close(with_aux, router.weight.grad)
    assert with_aux.abs().sum() > 0


def test_sequence_balancing_loss_counts_each_sequence_alone():
    router = make_router(top_k=2, load_balancing="seq_aux_loss", aux_loss_coeff=1.0)
    x = tokens(32)
    logits = x @ router.weight.T
    scores = torch.softmax(logits, dim=1)
    chosen = torch.zeros_like(scores).scatter(1, logits.topk(2).indices, 1.0)
    per_sequence = [E / (2 * 16**2) * (scores[s].sum(0) * chosen[s].sum(0)).sum()
                    for s in (slice(0, 16), slice(16, 32))]
    torch.testing.assert_close(router.load_balancing_loss(logits, batch=2), sum(per_sequence) / 2)


def test_z_loss_is_the_mean_squared_logsumexp():
    router = make_router(top_k=2, z_loss_coeff=1e-3, load_balancing="none")
    x = tokens()
    router(x, batch=1)
    expected = torch.logsumexp(x @ router.weight.T, dim=1).square().mean()
    torch.testing.assert_close(router.stats["z"], expected.detach())


def test_expert_bias_raises_underloaded_experts():
    router = make_router(top_k=2, score="sigmoid", expert_bias_update_rate=0.01)
    router.stats["tokens"] = torch.tensor([10.0, 0, 0, 0, 0, 0, 0, 6])  # mean 2
    router.update_expert_bias()
    assert router.expert_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, -0.01])


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_grouped_experts_equal_the_loop_and_idle_experts_get_zero_gradients(activation):
    counts = [5, 0, 7, 0]  # experts 1 and 3 receive no token
    results = []
    for kind in ("loop", "grouped"):
        cfg = ModelConfig(hidden_size=H, activation=activation,
                          moe=MoEConfig(num_experts=4, ffn_hidden_size=24, experts=kind))
        experts = Experts(cfg, Topology.single())
        for i, p in enumerate(experts.parameters()):
            torch.nn.init.normal_(p, std=0.2, generator=torch.Generator().manual_seed(i))
        x = tokens(12).requires_grad_(True)
        probs = torch.rand(12, generator=torch.Generator().manual_seed(5)).requires_grad_(True)
        y = experts(x, counts, probs)
        (y * tokens(12, seed=7)).sum().backward()
        grads = {n: p.grad for n, p in experts.named_parameters()}
        for name, grad in grads.items():
            assert (grad[1] == 0).all() and (grad[3] == 0).all() and grad[0].abs().sum() > 0, name
        results.append((y.detach(), x.grad, probs.grad, grads))
    (y0, gx0, gp0, g0), (y1, gx1, gp1, g1) = results
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(gx0, gx1)
    torch.testing.assert_close(gp0, gp1)
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name])


def test_experts_without_any_token_still_get_zero_gradients():
    cfg = ModelConfig(hidden_size=H, moe=MoEConfig(num_experts=2, ffn_hidden_size=8))
    experts = Experts(cfg, Topology.single())
    for p in experts.parameters():
        torch.nn.init.normal_(p)
    y = experts(torch.zeros(0, H), [0, 0], torch.zeros(0))
    y.sum().backward()
    assert all(p.grad is not None and (p.grad == 0).all() for p in experts.parameters())
