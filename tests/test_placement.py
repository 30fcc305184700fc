"""Placements and the bucket layout, without ranks: every rank's model is built on the meta device from its
Topology, and what the placements say is checked against the global tensors they claim to tile."""

import itertools

import pytest
import torch

from parallel.buckets import BucketLayout
from parallel.grad_norm import counted_here
from parallel.pipeline import Stage, pipeline_chunks
from parallel.placement import Placement, place, placement_of, replicated, split
from parallel.topology import Sizes, Topology
from pretrain.config_loading import load_config
from pretrain.model import GPT

VOCAB = 128
# TP2 with SP x PP2 with 2 chunks per stage x DP2; experts ETP2 x EP2 (EDP1); tied embeddings, GPAS, shared expert
SIZES = Sizes(world=8, tp=2, pp=2, ep=2, etp=2, sp=True)


def model_config():
    return load_config(None, [
        "model.num_layers=4", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.seq_length=16", "model.tie_embeddings=true", "model.gpas.enabled=true", "model.moe.num_experts=4",
        "model.moe.top_k=2", "model.moe.ffn_hidden_size=48", "model.moe.shared_expert_ffn_hidden_size=16",
        "model.moe.layer_freq=[0,0,1,1]",
    ]).model


@pytest.fixture(scope="module")
def every_rank():
    """(topology, stage, {name: placement}) of every rank of SIZES."""
    cfg = model_config()
    chunks = pipeline_chunks(cfg.num_layers, SIZES.pp, 2)
    out = []
    for rank in range(SIZES.world):
        topology = Topology.build(SIZES, rank, create_groups=False)
        stage = Stage.of(topology, chunks, tie_embeddings=True)
        with torch.device("meta"):
            model = GPT(cfg, VOCAB, topology, stage=stage)
        out.append((topology, stage, {n: placement_of(p) for n, p in model.named_parameters()}))
    return out


def coverage(placements: list[Placement]) -> torch.Tensor:
    """How many of `placements` hold each element of their global tensor."""
    count = torch.zeros(placements[0].global_shape, dtype=torch.int32)
    for placement in placements:
        count[placement.local_slices()] += 1
    return count


def test_the_pieces_of_every_parameter_tile_its_global_tensor(every_rank):
    names = {n for _, _, placements in every_rank for n in placements}
    for name in names:
        held = [placements[name] for _, _, placements in every_rank if name in placements]
        assert len({p.global_shape for p in held}) == 1, name
        count = coverage(held)
        assert count.min() == count.max() > 0, name  # every element held, each as often: equal replicas


def test_the_gradient_norm_counts_every_element_once(every_rank):
    """The rules of parallel/grad_norm.py without sharding: over all ranks, exactly one counts each element (with
    the distributed optimizer each data-group rank counts its own slice instead, which tiles by construction)."""
    names = {n for _, _, placements in every_rank for n in placements}
    for name in names:
        counted = [placements[name] for topology, _, placements in every_rank
                   if name in placements and counted_here(placements[name], topology, sharded=False)]
        assert torch.equal(coverage(counted), torch.ones_like(coverage(counted))), name


def test_each_kind_of_parameter_says_where_it_lives(every_rank):
    topology, stage, placements = every_rank[3]  # tp 1, dp 1, pp 0; etp 1, ep 1
    assert (topology.tp_rank, topology.pp_rank, topology.index_in("etp"), topology.index_in("ep")) == (1, 0, 1, 1)
    qkv = placements["layers.0.attention.qkv.weight"]  # column-parallel: output rows split over TP
    assert qkv.global_shape == (64, 32) and qkv.local_slices() == (slice(32, 64), slice(0, 32))
    out = placements["layers.0.attention.out.weight"]  # row-parallel: input columns
    assert out.local_slices() == (slice(0, 32), slice(16, 32)) and out.split_over_tensor_group
    embedding = placements["embedding.weight"]  # vocabulary rows; a tied copy on the first stage
    assert embedding.local_slices() == (slice(64, 128), slice(0, 32)) and embedding.tied
    norm = placements["layers.0.attn_norm.weight"]  # replicated, sees only this rank's tokens under SP
    assert norm.splits == () and norm.partial_over_tp and not norm.split_over_tensor_group
    assert placements["layers.0.gpas.gate"].partial_over_tp
    assert placements["layers.2.mlp.router.weight"].partial_over_tp
    shared = placements["layers.2.mlp.shared.up.weight"]  # the shared expert is a dense MLP on the TP group
    assert shared.data_group == "dp-cp" and shared.local_slices() == (slice(8, 16), slice(0, 32))
    up = placements["layers.2.mlp.experts.up"]  # expert stack: experts over EP, each MLP's columns over ETP
    assert up.expert and up.tensor_group == "etp" and up.data_group == "edp"
    assert up.experts == range(2, 4) and up.local_slices() == (slice(2, 4), slice(24, 48), slice(0, 32))
    assert up.describe() == ("rows 2..4 of dim 0 (ep), rows 24..48 of dim 1 (etp) of a tensor of global shape "
                             "(4, 48, 32)")
    down = placements["layers.2.mlp.experts.down"]
    assert down.local_slices() == (slice(2, 4), slice(0, 32), slice(24, 48))
    # chunks: stage 0 holds layers 0 and 2; the embedding belongs to its first chunk
    assert stage.chunks == (range(0, 1), range(2, 3))
    assert placements["layers.0.mlp.up.weight"].chunk == 0 and placements["layers.2.mlp.experts.up"].chunk == 1
    assert embedding.chunk == 0
    last = every_rank[4]  # pp 1: the embedding copy and the final norm belong to its last chunk
    assert last[0].pp_rank == 1 and last[1].chunks == (range(1, 2), range(3, 4))
    assert last[2]["embedding.weight"].tied and last[2]["embedding.weight"].chunk == 1
    assert last[2]["final_norm.weight"].chunk == 1 and last[2]["layers.1.mlp.up.weight"].chunk == 0


def test_one_stage_holds_the_tied_table_once_untied():
    cfg = model_config()
    with torch.device("meta"):
        model = GPT(cfg, VOCAB, Topology.single())
    assert not placement_of(model.embedding.weight).tied  # one copy: nothing to keep in sync
    assert {placement_of(p).chunk for p in model.parameters()} == {0}


def test_a_placement_must_describe_the_tensor_it_is_attached_to():
    with pytest.raises(ValueError, match=r"cannot hold rows 0..4 of dim 0 \(tp\)"):
        place(torch.nn.Parameter(torch.empty(3, 2)), Placement((8, 2), split(0, "tp", rank=0, size=2)))
    with pytest.raises(ValueError, match="has no placement"):
        placement_of(torch.nn.Parameter(torch.empty(2)))
    param = replicated(torch.nn.Parameter(torch.empty(2)))
    with pytest.raises(ValueError, match="already has a placement"):
        replicated(param)


# ---------------------------------------------------------------- the bucket layout


def parameters():
    """Dense weights of two pipeline chunks, an expert stack, a tied table: numels 10, 7, 5, 12, 3, 6."""
    def weight(numel, *, chunk=0, expert=False, tied=False):
        where = Placement((numel,), data_group="edp" if expert else "dp-cp", tied=tied, chunk=chunk)
        return place(torch.nn.Parameter(torch.empty(numel)), where)

    return [weight(10, tied=True), weight(7), weight(5), weight(12, chunk=1), weight(3, chunk=1, expert=True),
            weight(6, chunk=1)]


@pytest.mark.parametrize("sharded", [False, True])
@pytest.mark.parametrize("bucket_elements", [1, 11, 1000])
def test_bucket_layout(sharded, bucket_elements):
    params = parameters()
    layout = BucketLayout.build(params, replicas={"dp-cp": 4, "edp": 2}, bucket_elements=bucket_elements,
                                sharded=sharded)
    places = list(layout.places())
    assert sorted(id(p) for _, p, _, _ in places) == sorted(map(id, params))  # each parameter once
    covered = torch.zeros(layout.size, dtype=torch.int32)
    for bucket, p, a, b in places:
        assert b - a == p.numel() and bucket.start <= a < b <= bucket.end
        covered[a:b] += 1
    assert covered.max() == 1  # no overlap
    starts = [b.start for b in layout.buckets]
    assert starts == sorted(starts) and all(x.end == y.start for x, y in itertools.pairwise(layout.buckets))
    for bucket in layout.buckets:
        where = [placement_of(p) for p in bucket.params]
        assert len({(w.data_group, w.chunk, w.tied) for w in where}) == 1  # one kind, one chunk
        assert bucket.group == where[0].data_group and bucket.replicas == {"dp-cp": 4, "edp": 2}[bucket.group]
        if sharded:
            assert (bucket.end - bucket.start) % bucket.replicas == 0
            slices = [bucket.shard_range(r) for r in range(bucket.replicas)]
            assert slices[0][0] == bucket.start and slices[-1][1] == bucket.end
            assert all(x[1] == y[0] for x, y in itertools.pairwise(slices))
        else:
            assert bucket.end == bucket.start + sum(p.numel() for p in bucket.params)
    assert layout.buckets[-1].tied and layout.buckets[-1].params == (params[0],)  # summed over PP first: last
    assert not any(b.tied for b in layout.buckets[:-1])
    dense = [p for b in layout.buckets if b.group == "dp-cp" and not b.tied for p in b.params]
    assert dense == [params[5], params[3], params[2], params[1]]  # backward order: the reverse of the model's
    if bucket_elements == 1:  # every bucket closes at its first weight
        assert all(len(b.params) == 1 for b in layout.buckets)
    if bucket_elements == 1000:  # one bucket per (kind, chunk), plus the tied one
        assert [len(b.params) for b in layout.buckets] == [2, 2, 1, 1]
    if sharded:
        assert layout.shard_size == sum(b.shard_size for b in layout.buckets)
        assert [b.shard_start for b in layout.buckets] == list(
            itertools.accumulate([0] + [b.shard_size for b in layout.buckets[:-1]]))
