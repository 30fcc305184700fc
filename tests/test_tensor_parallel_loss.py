"""The output layer fused with the vocabulary-parallel cross-entropy, a chunk of tokens at a time, against today's
path (F.linear, then `vocab_parallel_cross_entropy` on the whole logits): losses, the gradient of the hidden states
and of the weight, on one rank and on TP2, for chunk sizes that divide the tokens, that do not, and that exceed them.

Error measure: the largest difference relative to the largest reference value (per tensor). The fused path repeats
today's arithmetic per token, so losses and hidden-state gradients differ only where a matmul kernel picks another
blocking for a chunk of rows (about 1e-7); the weight gradient is a sum over tokens that the chunks add in another
order (a few 1e-8 of its scale). An element-wise relative bound would not hold: gradient entries near zero are
differences of large terms, off by the same absolute amount as the others (observed up to 2e-3 relative there).
"""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from multirank import run_ranks
from parallel.tensor_parallel import (
    enter_tensor_parallel, vocab_parallel_cross_entropy, vocab_parallel_linear_cross_entropy,
)
from parallel.topology import Sizes, Topology
from pretrain.config_loading import load_config
from pretrain.model import GPT

BATCH, SEQ, HIDDEN, VOCAB = 3, 70, 32, 128  # 210 tokens
CHUNKS = [64, 70, 100, 1000, None]  # 100 does not divide 210; 1000 and None: one chunk
STDS = {"std 1": 1.0, "std 30": 30.0}  # of the logits; at std 30, exp overflows fp32 without the maximum
TOLERANCE = 1e-6


def worst(got: torch.Tensor, ref: torch.Tensor) -> float:
    """The largest difference relative to the largest reference value."""
    return float((got - ref).abs().max() / ref.abs().max())


def inputs(std: float, seed: int = 3):
    """Hidden states, a full output weight scaled so the logits have std `std`, labels over the whole vocabulary,
    and per-token upstream gradients (a weighted sum exercises the scaling by the incoming gradient)."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(BATCH, SEQ, HIDDEN, generator=generator)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator) * std / HIDDEN**0.5
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    return hidden, weight, labels, torch.rand(BATCH, SEQ, generator=generator)


def losses_and_grads(hidden, weight, labels, upstream, topology, *, chunk, autocast=False):
    """Per-token losses, the gradient of the hidden states (summed over TP) and of this rank's weight slice, by
    the fused path (`chunk` tokens at a time) or, with chunk="reference", by today's."""
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        entered = enter_tensor_parallel(hidden, topology)
        if chunk == "reference":
            logits = F.linear(entered, weight)
        else:
            losses = vocab_parallel_linear_cross_entropy(entered, weight, labels, topology=topology,
                                                         chunk_tokens=chunk)
    if chunk == "reference":  # as the trainer did: the model under autocast, the loss outside it
        losses = vocab_parallel_cross_entropy(logits, labels, topology)
    (losses * upstream).sum().backward()
    return losses.detach(), hidden.grad, weight.grad


def compare(got, ref, what: str, tolerance: float = TOLERANCE) -> list[float]:
    errors = [worst(a, b) for a, b in zip(got, ref)]
    for name, error in zip(("losses", "hidden gradient", "weight gradient"), errors):
        assert error <= tolerance, f"{what}: {name} off by {error:.2e} of its scale"
    return errors


@pytest.mark.parametrize("std", list(STDS))
def test_fused_chunked_loss_matches_the_unfused_one_on_one_rank(std):
    hidden, weight, labels, upstream = inputs(STDS[std])
    topology = Topology.single()
    ref = losses_and_grads(hidden, weight, labels, upstream, topology, chunk="reference")
    for chunk in CHUNKS:
        got = losses_and_grads(hidden, weight, labels, upstream, topology, chunk=chunk)
        assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
        compare(got, ref, f"{std}, chunk {chunk}")


def both_paths_on_tp2(rank, world, cases):
    """Per case: the reference and the fused results for each chunk size, on this rank's half of the vocabulary."""
    topology = Topology.build(Sizes(world=2, tp=2), rank)
    out = {}
    for case, (hidden, weight, labels, upstream) in cases.items():
        half = weight.shape[0] // 2
        local = weight[rank * half:(rank + 1) * half]
        out[case] = {chunk: losses_and_grads(hidden, local, labels, upstream, topology, chunk=chunk)
                     for chunk in ["reference", *CHUNKS]}
    return out


def test_fused_chunked_loss_matches_the_unfused_one_on_tp2():
    """Labels fall in both vocabulary halves, so each rank sees targets outside its slice; the maximum, the
    target logit and the sum of exponentials cross the TP group once per chunk."""
    cases = {std: inputs(value, seed=5) for std, value in STDS.items()}
    results = run_ranks(2, both_paths_on_tp2, cases)
    for rank, result in enumerate(results):
        for case, by_chunk in result.items():
            for chunk in CHUNKS:
                compare(by_chunk[chunk], by_chunk["reference"], f"rank {rank}, {case}, chunk {chunk}")
    # the gradient of the hidden states is the full one (summed over TP): the same on both ranks
    torch.testing.assert_close(results[0]["std 1"][64][1], results[1]["std 1"][64][1], rtol=0, atol=0)


def test_under_autocast_the_matmuls_run_in_bf16_as_f_linear_would():
    """The reference's F.linear under autocast gives bf16 logits (the fp32 loss math starts from them) and a bf16
    weight gradient over all tokens at once. The fused path casts alike, so losses and hidden-state gradients are
    today's to fp32 rounding, and in one chunk the weight gradient too. Over several chunks each chunk's bf16
    product is rounded before the fp32 sum, where the reference rounds the whole sum once: the two differ by
    about one bf16 step of the largest entry (2^-8 of [0.5, 1), observed 5.7e-3 of the scale), and the chunked
    one is no farther from the fp32 gradient than the reference (observed 3.9e-3 against 5.1e-3)."""
    hidden, weight, labels, upstream = inputs(1.0)
    topology = Topology.single()
    ref = losses_and_grads(hidden, weight, labels, upstream, topology, chunk="reference", autocast=True)
    fp32 = losses_and_grads(hidden, weight, labels, upstream, topology, chunk="reference")
    assert worst(ref[1], fp32[1]) > 1e-3  # bf16 really ran: far from the fp32 result
    for chunk in CHUNKS:
        got = losses_and_grads(hidden, weight, labels, upstream, topology, chunk=chunk, autocast=True)
        assert got[0].dtype == got[1].dtype == got[2].dtype == torch.float32
        assert worst(got[0], ref[0]) <= TOLERANCE and worst(got[1], ref[1]) <= TOLERANCE, f"chunk {chunk}"
        if chunk in (1000, None):
            assert worst(got[2], ref[2]) <= TOLERANCE
        else:
            assert worst(got[2], ref[2]) <= 2**-7, f"chunk {chunk}"
            assert worst(got[2], fp32[2]) <= 1.25 * worst(ref[2], fp32[2]), f"chunk {chunk}"


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages that ops create, from the op until the storage is freed; `peak`: the most at
    once. What exists before (`already`) is not counted."""

    def __init__(self, already=()):
        super().__init__()
        self.live = self.peak = 0
        self.counted = {t.untyped_storage().data_ptr() for t in already}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in self.counted:
                storage = t.untyped_storage()
                self.counted.add(storage.data_ptr())
                self.live += storage.nbytes()
                self.peak = max(self.peak, self.live)
                weakref.finalize(storage, self._freed, storage.data_ptr(), storage.nbytes())
        return out

    def _freed(self, key, nbytes):
        self.counted.discard(key)
        self.live -= nbytes


def loss_memory(tokens: int, *, chunk, vocab: int = 4096, hidden: int = 16) -> tuple[int, int]:
    """(peak bytes during forward and backward, bytes held from forward to backward) of the loss on one rank."""
    generator = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=generator).requires_grad_()
    w = torch.randn(vocab, hidden, generator=generator).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    with LiveBytes(already=(h, w, labels)) as memory:
        if chunk == "unfused":
            losses = vocab_parallel_cross_entropy(F.linear(h, w), labels, Topology.single())
        else:
            losses = vocab_parallel_linear_cross_entropy(h, w, labels, topology=Topology.single(), chunk_tokens=chunk)
        held = memory.live
        losses.mean().backward()
    return memory.peak, held


def test_peak_memory_grows_with_the_chunk_not_with_the_tokens():
    """Unfused, the logits, their shifted copy and the softmax saved for backward are three fp32 [tokens, vocab]
    tensors; fused, about one chunk's fp32 logits plus the weight gradient, whatever the tokens, and only 12 bytes
    a token (loss, maximum, sum of exponentials) from forward to backward."""
    chunk, vocab, hidden = 128, 4096, 16
    chunk_logits, weight = 4 * chunk * vocab, 4 * vocab * hidden
    small, small_held = loss_memory(256, chunk=chunk)
    large, large_held = loss_memory(4096, chunk=chunk)
    assert large <= small + 4096 * 4 * (hidden + 4)  # grows only by per-token vectors (grad of hidden, losses)
    assert large <= chunk_logits + 2 * weight + 4096 * 4 * (hidden + 4)
    assert small_held <= 12 * 256 and large_held <= 12 * 4096
    unfused, unfused_held = loss_memory(4096, chunk="unfused")
    assert unfused >= 3 * 4 * 4096 * vocab and unfused_held >= 4 * 4096 * vocab  # what the fused path avoids


@pytest.mark.parametrize("tied", [False, True])
def test_model_loss_with_labels_is_the_loss_of_its_logits(tied):
    """GPT.forward with labels (the fused output layer and loss, 5 tokens a chunk: 32 tokens do not divide)
    against the cross-entropy of its logits: same per-token losses, same gradient of every parameter."""
    cfg = load_config(None, ["model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4",
                             "model.seq_length=16", "model.loss_chunk_tokens=5",
                             f"model.tie_embeddings={str(tied).lower()}"]).model
    model = GPT(cfg, 64, Topology.single())
    model.init_parameters(0)
    generator = torch.Generator().manual_seed(2)
    ids, labels = torch.randint(0, 64, (2, 2, 16), generator=generator)
    fused = model(ids, labels=labels)
    assert fused.shape == labels.shape and fused.dtype == torch.float32
    fused.mean().backward()
    fused_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    logits = model(ids)
    assert logits.shape == (2, 16, 64)
    unfused = vocab_parallel_cross_entropy(logits, labels, Topology.single())
    unfused.mean().backward()
    assert worst(fused.detach(), unfused.detach()) <= TOLERANCE
    for name, p in model.named_parameters():
        assert worst(fused_grads[name], p.grad) <= 1e-5, name  # through the layers: a few 1e-7 observed


def test_loss_chunk_tokens_may_be_null():
    """null: one chunk (0 and negative values are refused, naming the field: tests/test_config.py)."""
    assert load_config(None, ["model.loss_chunk_tokens=null"]).validate().model.loss_chunk_tokens is None
