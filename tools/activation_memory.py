"""Measure on the CPU what launch/estimate.py's `activation_bytes` estimates: the activation memory of one micro-batch.

    python -m tools.activation_memory CONFIG.yaml [section.key=value ...]

Runs one micro-batch of the config's model (one rank, random tokens) forward and backward under the trainer's
autocast, and reports in bytes:
  saved   the tensors autograd saves for backward (`saved_tensors_hooks`), each storage once (views of one
          storage count once), parameters excluded (the estimate counts them as weights) but the bf16 copies
          of them that autocast makes kept;
  kept    the storages made in the forward pass that are still alive when it returns (what the backward pass
          will read: the same as `saved` without recomputation, and under recomputation the layer inputs and
          the cache of `selective` that checkpointing keeps, which autograd's hooks do not see);
  forward the peak of the storages alive during the forward pass (`kept` plus the largest temporary: one chunk
          of logits of the fused loss);
  peak    the peak during the backward pass of the storages made by the forward pass or by a recomputation,
          gradients excluded (the estimate's `full`: the inputs kept plus one layer recomputed at a time).
The estimate's "activations" are compared with max(forward, peak). On a GPU the caching allocator adds its
fragmentation; here every storage is counted at its size.
"""

from __future__ import annotations

import sys
from contextlib import nullcontext

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveStorages(TorchDispatchMode):
    """Records every storage an operator returns, and polls the bytes of those still alive after each operator:
    their peak (since `reset`) is what the forward pass or a recomputation holds at its worst."""

    def __init__(self, excluded: set[int]):
        super().__init__()
        self.excluded = excluded  # data_ptr of storages not counted (parameters, their gradients, inputs)
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}
        self.backward = False  # then only a recomputation (which runs with grad mode on) is recorded
        self.peak = 0

    def live(self) -> int:
        self.storages = {ptr: (ref, n) for ptr, (ref, n) in self.storages.items() if not ref.expired()}
        return sum(n for _, n in self.storages.values())

    def reset(self) -> None:
        self.peak = self.live()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.backward or torch.is_grad_enabled():
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type != "meta":
                    storage = t.untyped_storage()
                    ptr = storage.data_ptr()
                    if storage.nbytes() and ptr not in self.excluded:
                        known = self.storages.get(ptr)
                        if known is None or known[0].expired():
                            self.storages[ptr] = (StorageWeakRef(storage), storage.nbytes())
            self.peak = max(self.peak, self.live())
        return out


def measure(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, *,
            dtype: torch.dtype | None = None) -> dict[str, int]:
    """One micro-batch of `model` (a GPT, its last stage holding the loss) forward and backward under autocast to
    `dtype` (None: fp32, no autocast, as the trainer's precision.dtype=fp32); the bytes described in the module
    docstring. Under tensor parallelism every rank calls it (the collectives run) and measures its own."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    mode = _LiveStorages(params | {ids.untyped_storage().data_ptr(), labels.untyped_storage().data_ptr()})
    autocast = torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext()
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with autocast:  # as Trainer.stage_forward
            losses = model(ids, labels=labels)
        loss = losses.float().mean()
        kept, forward = mode.live(), mode.peak
        mode.reset()
        mode.backward = True  # gradients are not activations: the engine computes them with grad mode off
        loss.backward()
    return {"saved": sum(saved.values()), "kept": kept, "forward": forward, "peak": max(mode.peak, kept)}


def measure_config(path: str | None, overrides: list[str], *, world_size: int = 1, rank: int = 0) -> dict[str, int]:
    """`measure` of one micro-batch of a config's model on rank `rank` of a `world_size` layout (torch.distributed
    started when it is more than one), with random tokens, the same on every rank."""
    import dataclasses

    from parallel.topology import Topology
    from pretrain.config_loading import load_config
    from pretrain.model import GPT

    cfg = load_config(path, overrides)
    m = dataclasses.replace(cfg.model, norm_impl="torch")
    vocab = m.vocab_size or 384
    topology = Topology.build(cfg.sizes(world_size), rank) if world_size > 1 else Topology.single()
    model = GPT(m, vocab, topology)
    model.init_parameters(cfg.run.seed)
    tokens = torch.randint(0, vocab, (cfg.train.micro_batch_size, m.seq_length + 1),
                           generator=torch.Generator().manual_seed(0))
    dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else None
    return measure(model, tokens[:, :-1], tokens[:, 1:], dtype=dtype)


def main(argv: list[str]) -> int:
    from launch.estimate import human_bytes

    paths = [a for a in argv if "=" not in a]
    result = measure_config(paths[0] if paths else None, [a for a in argv if "=" in a])
    print("  ".join(f"{k} {human_bytes(v)}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
