"""Rank placement: Megatron-LM's masked orthogonal rank groups, reproduced exactly (its worked examples)."""

import pytest

from parallel.topology import Sizes, TopologyError, Topology, describe, group_tables


def test_sixteen_ranks_tp2_cp2_pp2_with_experts_folded_over_a_stage():
    t = group_tables(Sizes(world=16, tp=2, cp=2, pp=2, ep=8, etp=1))
    assert t["tp"][:4] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t["cp"][:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t["dp"][:4] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert t["dp-cp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert t["tp-cp"][:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert t["pp"][:4] == [[0, 8], [1, 9], [2, 10], [3, 11]]
    assert t["ep"] == [list(range(8)), list(range(8, 16))]  # EP folds over TP x CP x DP of one stage
    assert t["etp"][:3] == [[0], [1], [2]] and t["edp"][:3] == [[0], [1], [2]]
    assert t["tp-ep"] == t["ep"]
    assert t["embedding"][:2] == [[0, 8], [1, 9]]


def test_eight_ranks_tp2_dp4_with_etp2_ep2():
    t = group_tables(Sizes(world=8, tp=2, ep=2, etp=2))
    assert t["etp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert t["ep"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert t["edp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_order_string_changes_placement():
    t = group_tables(Sizes(world=4, tp=2, order="tp-dp-cp-ep-pp"))
    assert t["dp"] == [[0, 2], [1, 3]]
    t = group_tables(Sizes(world=4, tp=2, order="dp-tp-cp-ep-pp"))
    assert t["tp"] == [[0, 2], [1, 3]] and t["dp"] == [[0, 1], [2, 3]]


@pytest.mark.parametrize("sizes, message", [
    (Sizes(world=8, tp=3), "3 x 1 x 1 = 3 does not divide the world size 8"),
    (Sizes(world=8, ep=3), "parallel.expert_tensor x parallel.expert x parallel.pipeline = 1 x 3 x 1"),
    (Sizes(world=8, order="tp-dp"), "name each of tp, cp, ep, dp, pp once"),
    (Sizes(world=8, tp=2, pp=2, ep=4, etp=1, order="tp-cp-pp-ep-dp"), "does not end with pp"),
])
def test_impossible_layouts(sizes, message):
    with pytest.raises(TopologyError, match=message):
        group_tables(sizes)


def test_coordinates_and_describe():
    topo = Topology.build(Sizes(world=8, tp=2, cp=2), 6, create_groups=False)
    assert (topo.tp_rank, topo.cp_rank, topo.dp_rank, topo.index_in("dp-cp")) == (0, 1, 1, 3)
    text = describe(Sizes(world=8, tp=2, cp=2))
    assert "    6 |   0   1   1   0 |   0   0   3" in text
    assert "dp-cp groups: [0, 2, 4, 6] [1, 3, 5, 7]" in text
