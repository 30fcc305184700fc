import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from data.indexed import token_dtype, write_indexed_dataset  # noqa: E402
from pretrain.config_loading import load_config  # noqa: E402


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> str:
    """A small indexed dataset of text-like byte documents (random, but with structure to learn)."""
    rng = np.random.default_rng(0)
    words = [rng.integers(97, 123, size=rng.integers(2, 7)) for _ in range(40)]
    docs = []
    for _ in range(300):
        picks = rng.integers(0, len(words), size=rng.integers(5, 40))
        doc = np.concatenate([np.append(words[i], 32) for i in picks] + [[256]])
        docs.append(doc)
    prefix = str(tmp_path_factory.mktemp("corpus") / "tiny")
    write_indexed_dataset(prefix, docs, token_dtype(258))
    return prefix


def tiny_config(tmp_path, corpus: str, *overrides: str):
    """A model and run small enough for a unit test: a few steps in well under a second each."""
    base = [
        f"run.dir={tmp_path / 'run'}",
        "model.num_layers=2", "model.hidden_size=32", "model.num_attention_heads=4", "model.num_query_groups=2",
        "model.seq_length=16", "model.vocab_multiple=64",
        "train.iters=6", "train.global_batch_size=4", "train.micro_batch_size=2",
        "scheduler.warmup_iters=2", "optimizer.lr=3e-3", "scheduler.min_lr=3e-4",
        f"data.sources={{tiny: {{prefixes: [{corpus}]}}}}", "eval.interval=3", "eval.iters=1",
        "logging.interval=1", "logging.tensorboard=false", "checkpoint.interval=3",
    ]
    return load_config(None, base + list(overrides))
