"""Generation through the key-value cache (pretrain/generation.py) against full recomputation: at every step the
cached logits equal those of the whole sequence run again without a cache (within fp32 rounding), and greedy
and seeded sampling give exactly the same tokens; on one rank, on TP2 with sequence parallelism, and with the
experts on EP2 (each DP rank its own prompts, stopping at different steps)."""

import pytest
import torch

from multirank import run_ranks
from parallel.topology import Sizes, Topology
from pretrain.config_loading import load_config
from pretrain.generation import GenerationError, Sampling, generate, sample
from pretrain.model import GPT

VOCAB = 128
PROMPTS = [[5, 9, 3, 77, 12], [40], [8, 8, 8, 1, 2, 3, 4, 5, 6], [100, 7]]


def model_config(*overrides: str):
    base = ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
            "model.seq_length=32", "model.init_std=0.2"]  # large weights: sharp, well-separated logits
    return load_config(None, base + list(overrides)).resolved(VOCAB)


def build(cfg, topology: Topology) -> GPT:
    torch.manual_seed(0)
    model = GPT(cfg.model, VOCAB, topology)
    model.init_parameters(seed=7)
    return model


def recomputed(model: GPT, prompts: list[list[int]], sampling: Sampling, seed: int | None):
    """The reference: at every step each row's whole sequence runs again through the ordinary forward (one row
    at a time, no padding, no cache); the same sampler draws from the stacked logits."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    rows = [list(p) for p in prompts]
    tokens, done, steps = [[] for _ in prompts], [False] * len(prompts), []
    model.eval()
    with torch.no_grad():
        for _ in range(sampling.max_new_tokens):
            logits = torch.stack([model(torch.tensor([r]))[0, -1] for r in rows]).float()
            steps.append(logits)
            token = sample(logits, sampling, generator)
            for i, t in enumerate(token.tolist()):
                if not done[i]:
                    tokens[i].append(t)
                    done[i] = t in sampling.stop_ids
                rows[i].append(t)
            if all(done):
                break
    return tokens, steps


def cached(model: GPT, prompts, sampling: Sampling, seed: int | None, **kwargs):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return generate(model, prompts, sampling, generator=generator, keep_logits=True, **kwargs)


def assert_same(out, tokens, steps, *, rows=None):
    assert out.tokens == tokens
    for got, want in zip(out.logits, steps):
        torch.testing.assert_close(got if rows is None else got[rows], want, rtol=1e-5, atol=1e-5)


SAMPLINGS = {
    "greedy": (Sampling(max_new_tokens=12, temperature=0.0), None),
    "seeded": (Sampling(max_new_tokens=12, temperature=0.8, top_p=0.9), 3),
}


@pytest.mark.parametrize("kind", list(SAMPLINGS))
def test_the_cache_equals_recomputation_on_one_rank(kind):
    sampling, seed = SAMPLINGS[kind]
    model = build(model_config(), Topology.single())
    out = cached(model, PROMPTS, sampling, seed)
    tokens, steps = recomputed(model, PROMPTS, sampling, seed)
    assert_same(out, tokens, steps)
    assert out.steps == 12 and out.new_tokens == 4 * 12 and not any(out.stopped)
    assert len(set(map(tuple, out.tokens))) > 1  # the rows really differ


def test_the_cache_equals_recomputation_with_qk_norm_head_dim_and_llama3_rope():
    """Qwen3's q/k norms, a head wider than hidden / heads and Llama-3.1's rescaled frequencies go through the cache
    as through the whole forward (left-padded rows: each row's positions start at 0)."""
    sampling, seed = SAMPLINGS["greedy"]
    model = build(model_config("model.qk_norm=true", "model.head_dim=16", "model.rope_scaling.type=llama3",
                               "model.rope_scaling.original_max_position_embeddings=8"), Topology.single())
    out = cached(model, PROMPTS, sampling, seed)
    assert_same(out, *recomputed(model, PROMPTS, sampling, seed))


def test_stop_ids_end_a_row_and_are_kept():
    model = build(model_config(), Topology.single())
    free = cached(model, PROMPTS, Sampling(max_new_tokens=12, temperature=0.0), None)
    stop = free.tokens[0][3]  # a token the first row draws at its 4th step
    out = cached(model, PROMPTS, Sampling(max_new_tokens=12, temperature=0.0, stop_ids=(stop,)), None)
    assert out.tokens[0] == free.tokens[0][:4] and out.stopped[0]
    for row, tokens in enumerate(free.tokens[1:], start=1):
        end = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert out.tokens[row] == tokens[:end] and out.stopped[row] == (stop in tokens)


def test_the_vocabulary_limit_and_top_p():
    logits = torch.tensor([[0.0, 3.0, 2.9, 5.0, 9.0]])
    assert sample(logits, Sampling(max_new_tokens=1, temperature=0.0, vocab_limit=4), None).item() == 3
    draws = {sample(logits, Sampling(max_new_tokens=1, top_p=0.5), torch.Generator().manual_seed(i)).item()
             for i in range(50)}
    assert draws == {4}  # token 4 alone holds more than half the mass
    draws = {sample(logits, Sampling(max_new_tokens=1, temperature=5.0), torch.Generator().manual_seed(i)).item()
             for i in range(200)}
    assert draws == {0, 1, 2, 3, 4}


def test_one_prefill_shared_by_several_samples_of_a_prompt():
    """share_prefill=G gives what sampling the G copies of each prompt from their own prefill gives."""
    sampling, seed = SAMPLINGS["seeded"]
    model = build(model_config(), Topology.single())
    shared = cached(model, PROMPTS[:2], sampling, seed, share_prefill=3)
    repeated = cached(model, [p for p in PROMPTS[:2] for _ in range(3)], sampling, seed)
    assert shared.tokens == repeated.tokens
    for a, b in zip(shared.logits, repeated.logits):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("settings, message", [
    (dict(max_new_tokens=0), "max_new_tokens=0"),
    (dict(max_new_tokens=4, temperature=-1.0), "temperature=-1.0"),
    (dict(max_new_tokens=4, top_p=0.0), "top_p=0.0"),
])
def test_bad_sampling_settings_are_refused(settings, message):
    model = build(model_config(), Topology.single())
    with pytest.raises(GenerationError, match=message):
        generate(model, PROMPTS, Sampling(**settings))


def test_pipeline_and_context_parallelism_are_refused():
    from pretrain.generation import check_layout
    for sizes in (Sizes(world=2, pp=2), Sizes(world=2, cp=2)):
        with pytest.raises(GenerationError, match="parallel.pipeline=1 and parallel.context=1"):
            check_layout(Topology.build(sizes, 0, create_groups=False))


def _on_ranks(rank, world, overrides, sizes, prompts_by_rank, kind):
    cfg = model_config(*overrides)
    sampling, seed = SAMPLINGS[kind]
    model = build(cfg, Topology.build(sizes, rank))
    out = cached(model, prompts_by_rank[rank % len(prompts_by_rank)], sampling, seed)
    return out.tokens, out.logits, out.steps


@pytest.mark.parametrize("kind", list(SAMPLINGS))
def test_tensor_parallel_with_sequence_parallelism_equals_one_rank(kind):
    """TP2 SP: the 4 prompts' rows are split over the 2 ranks in every forward (3 prompts: padded to 4)."""
    sampling, seed = SAMPLINGS[kind]
    one = build(model_config(), Topology.single())
    for prompts in (PROMPTS, PROMPTS[:3]):
        tokens, steps = recomputed(one, prompts, sampling, seed)
        results = run_ranks(2, _on_ranks, [], Sizes(world=2, tp=2, sp=True), [prompts], kind)
        for got_tokens, got_logits, _ in results:
            assert got_tokens == tokens
            for got, want in zip(got_logits, steps):
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_experts_on_two_ranks_equal_one_rank():
    """A dropless MoE with its experts on EP2 over DP2: each rank samples its own prompts and stops on its own
    step (stop ids), yet both run every forward together (the experts' all-to-all needs both)."""
    moe = ["model.moe.num_experts=4", "model.moe.top_k=2"]
    sampling = Sampling(max_new_tokens=10, temperature=0.0)
    one = build(model_config(*moe), Topology.single())
    by_rank = [PROMPTS[:2], PROMPTS[2:]]
    expected = [recomputed(one, p, sampling, None) for p in by_rank]
    stop = expected[0][0][0][2]  # rank 0's first row stops after 3 tokens
    sampling = Sampling(max_new_tokens=10, temperature=0.0, stop_ids=(stop,))
    expected = [recomputed(one, p, sampling, None) for p in by_rank]
    results = run_ranks(2, _on_ranks_stopping, moe, Sizes(world=2, ep=2), by_rank, sampling)
    for (tokens, logits, _), (want_tokens, want_steps) in zip(results, expected):
        assert tokens == want_tokens
        for got, want in zip(logits, want_steps):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _on_ranks_stopping(rank, world, overrides, sizes, prompts_by_rank, sampling):
    model = build(model_config(*overrides), Topology.build(sizes, rank))
    out = generate(model, prompts_by_rank[rank], sampling, keep_logits=True)
    return out.tokens, out.logits, out.steps
