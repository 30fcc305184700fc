"""The pipeline's layer split and schedules, checked on their own (no ranks): every stage runs each forward and
backward once, in an order that respects the data flow, and the message plan pairs every send with a receive."""

import pytest

from parallel.pipeline import Action, PipelineSchedule, bubble_fraction, pipeline_chunks, stage_order


def test_chunks_are_interleaved_over_stages():
    assert pipeline_chunks(8, 2, 2) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    assert pipeline_chunks(6, 2, 1, first=2) == [[range(0, 2)], [range(2, 6)]]
    # first/last apply to the virtual stages holding the embedding and the output layer
    assert pipeline_chunks(8, 2, 2, first=1, last=1) == [[range(0, 1), range(4, 7)], [range(1, 4), range(7, 8)]]
    with pytest.raises(ValueError, match="parallel.pipeline x parallel.virtual_pipeline = 2 x 2 = 4 chunks"):
        pipeline_chunks(6, 2, 2)


LAYOUTS = [(p, v, m) for p in (1, 2, 3, 4) for v in (1, 2, 3) for m in (p, 2 * p, 3 * p) if p > 1 or v == 1]


@pytest.mark.parametrize("stages, chunks, micro_batches", LAYOUTS)
def test_every_stage_runs_each_forward_and_backward_once(stages, chunks, micro_batches):
    schedule = PipelineSchedule(stages, micro_batches, chunks)
    expected = {Action(b, i, c) for b in (False, True) for i in range(micro_batches) for c in range(chunks)}
    for stage, order in enumerate(schedule.orders):
        assert len(order) == len(expected) and set(order) == expected
        position = {a: k for k, a in enumerate(order)}
        assert all(position[Action(False, a.micro_batch, a.chunk)] < k for k, a in enumerate(order) if a.backward)
        for chunk in range(chunks):  # each chunk sees its micro-batches in order, forward and backward
            for backward in (False, True):
                seen = [a.micro_batch for a in order if a.backward == backward and a.chunk == chunk]
                assert seen == sorted(seen)


@pytest.mark.parametrize("stages, chunks, micro_batches", LAYOUTS)
def test_messages_pair_up_and_follow_the_data(stages, chunks, micro_batches):
    """Every tensor is sent and received at the same tick, and used at a later tick by the action it was
    meant for, on the stage it was sent to."""
    schedule = PipelineSchedule(stages, micro_batches, chunks)
    sent, received, ran = {}, {}, {}
    for stage, ticks in enumerate(schedule.ticks):
        assert [t.clock for t in ticks] == sorted({t.clock for t in ticks})
        for tick in ticks:
            if tick.action:
                ran[(stage, tick.action)] = tick.clock
            for peer, action in tick.sends:
                sent[(peer, action)] = tick.clock
            for peer, action in tick.receives:
                received[(stage, action)] = tick.clock
                assert schedule.consumer(peer, Action(action.backward, action.micro_batch, _source_chunk(
                    schedule, peer, stage, action))) == (stage, action)
    assert sent == received
    assert len(ran) == stages * 2 * micro_batches * chunks
    for (stage, action), clock in ran.items():
        if schedule.needs_input(stage, action):
            assert received[(stage, action)] < clock
        else:
            assert (stage, action) not in received


def _source_chunk(schedule, source, stage, action):
    """The chunk of `source` whose result feeds `action` on `stage` (the ring wraps from the last stage)."""
    step = -1 if action.backward else 1
    virtual = action.chunk * schedule.stages + stage - step
    assert virtual % schedule.stages == source
    return virtual // schedule.stages


@pytest.mark.parametrize("stages, chunks, micro_batches", LAYOUTS)
def test_in_flight_and_bubble(stages, chunks, micro_batches):
    schedule = PipelineSchedule(stages, micro_batches, chunks)
    for stage in range(stages):
        bound = stages - stage + (chunks - 1) * stages  # 1F1B: p - s micro-batches
        assert schedule.most_in_flight(stage) == min(bound, micro_batches * chunks)
    if chunks == 1:  # with unit-time forwards and backwards the plan's length is the textbook one
        assert schedule.length == 2 * (micro_batches + stages - 1)


def test_interleaving_shrinks_the_bubble():
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)


def test_evaluation_runs_forwards_only():
    schedule = PipelineSchedule(2, 4, 2, train=False)
    assert all(not a.backward for order in schedule.orders for a in order)
    assert stage_order(2, 1, 4, chunks=2, train=False)[:3] == [
        Action(False, 0, 0), Action(False, 1, 0), Action(False, 0, 1)]
