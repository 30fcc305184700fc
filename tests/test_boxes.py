"""pretrain/boxes.py: the boxes of a flat range, the complement of a box, and DCP reading boxes saved by another
layout (2 gloo ranks save uneven flat slices of a stack of experts; 3 ranks read other boxes of it)."""

import math
import random

import pytest
import torch
import torch.distributed.checkpoint as dcp

from multirank import run_ranks
from pretrain.boxes import boxed, complement, flat_boxes, shifted


def _mask(shape, boxes):
    counts = torch.zeros(shape, dtype=torch.int64)
    for offsets, sizes in boxes:
        counts[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))] += 1
    return counts


@pytest.mark.parametrize("seed", range(40))
def test_flat_boxes_cover_the_range_once_in_flat_order(seed):
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 5) for _ in range(rng.randint(1, 4)))
    total = math.prod(shape)
    lo = rng.randrange(total)
    hi = rng.randint(lo + 1, total)
    boxes = flat_boxes(shape, lo, hi)
    assert len(boxes) <= 2 * len(shape) - 1
    flat = torch.arange(total).view(shape)
    pieces = [flat[tuple(slice(o, o + n) for o, n in zip(offsets, sizes))].reshape(-1) for offsets, sizes in boxes]
    assert torch.equal(torch.cat(pieces), torch.arange(lo, hi))  # each box contiguous, together the range, in order


@pytest.mark.parametrize("seed", range(20))
def test_the_complement_of_a_box_covers_the_rest_once(seed):
    rng = random.Random(seed)
    shape = tuple(rng.randint(1, 6) for _ in range(rng.randint(1, 4)))
    offsets = tuple(rng.randrange(n) for n in shape)
    sizes = tuple(rng.randint(1, n - o) for n, o in zip(shape, offsets))
    counts = _mask(shape, complement(shape, (offsets, sizes)) + [(offsets, sizes)])
    assert torch.equal(counts, torch.ones(shape, dtype=torch.int64))
    assert shifted([((0, 1), (2, 2))], (3, 4)) == [((3, 5), (2, 2))]


FULL = torch.arange(4 * 6 * 5, dtype=torch.float32).view(4, 6, 5)  # 4 experts of [6, 5]


def _pieces(rank: int, ranges) -> list:
    """Rank r holds experts 2r..2r+2 (EP2); its pieces are flat ranges of them, as ZeRO bucket slices cut them."""
    local, pieces = FULL[2 * rank:2 * rank + 2].clone(), []
    for lo, hi in ranges:
        flat, at = local.reshape(-1)[lo:hi].clone(), 0
        for offsets, sizes in shifted(flat_boxes(local.shape, lo, hi), (2 * rank, 0, 0)):
            pieces.append(((offsets, sizes), flat[at:at + math.prod(sizes)].view(sizes)))
            at += math.prod(sizes)
    return pieces


def _save(rank, world, path, ranges):
    pieces = _pieces(rank, ranges[rank])
    dcp.save({"w": boxed(pieces, FULL.shape, region=((2 * rank, 0, 0), (2, 6, 5)))}, checkpoint_id=path)


def _load(rank, world, path):
    """Rank r reads columns of the last dim: another box entirely."""
    lo, hi = [(0, 2), (2, 3), (3, 5)][rank]
    mine = torch.zeros(4, 6, hi - lo)
    dcp.load({"w": boxed([(((0, 0, lo), (4, 6, hi - lo)), mine)], FULL.shape)}, checkpoint_id=path)
    return mine


def test_boxes_saved_by_one_layout_load_into_another(tmp_path):
    """Uneven flat cuts (23 and 41 of 60) saved by EP2, read back as column slabs by 3 ranks."""
    path = str(tmp_path / "ckpt")
    run_ranks(2, _save, path, [[(0, 23), (23, 60)], [(0, 41), (41, 60)]])
    loaded = run_ranks(3, _load, path)
    assert torch.equal(torch.cat(loaded, dim=2), FULL)


def test_boxes_that_leave_holes_are_refused_by_dcp(tmp_path):
    with pytest.raises(AssertionError, match="Failed to validate global plan"):
        run_ranks(2, _save, str(tmp_path / "ckpt"), [[(7, 60)], [(0, 41)]])
