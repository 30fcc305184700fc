import math

import pytest

from pretrain.config import OptimizerConfig, SchedulerConfig
from pretrain.schedule import learning_rate


def lr(step, decay, total=110, **kw):
    sched = SchedulerConfig(warmup_iters=10, decay=decay, min_lr=0.1, **kw)
    return learning_rate(step, total, opt=OptimizerConfig(lr=1.0), sched=sched)


@pytest.mark.parametrize("decay", ["cosine", "linear", "wsd", "constant"])
def test_linear_warmup(decay):
    assert lr(1, decay) == pytest.approx(0.1)
    assert lr(5, decay) == pytest.approx(0.5)
    assert lr(10, decay) == pytest.approx(1.0)


def test_cosine_and_linear_reach_the_floor():
    assert lr(60, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr(60, "linear") == pytest.approx(0.55)
    for decay in ("cosine", "linear", "wsd"):
        assert lr(110, decay) == pytest.approx(0.1)
        assert lr(500, decay) == pytest.approx(0.1)  # past the decay: the floor, never below


def test_wsd_is_stable_then_decays():
    assert lr(90, "wsd") == pytest.approx(1.0)  # progress 0.8: end of the stable phase
    assert lr(100, "wsd") == pytest.approx(0.55)  # half-way through the final 20%


def test_constant_after_warmup():
    assert lr(100, "constant") == 1.0
