"""The key-value cache of generation: each decoder layer's keys and values of the tokens seen so far.

Rows are left-padded: a batch of prompts of different lengths shares one column index, row b's
tokens starting at column `start[b]`. A token's rotary position is its column minus its row's
start, so a padded row computes what the same prompt computes alone; its pad columns are masked
out of attention. One forward writes the keys and values of its new columns into every layer,
then `advance` moves the filled length past them.

Under tensor parallelism each rank caches its own query groups (the local heads of the fused
query/key/value layer), so the cache is sharded like attention itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Keys and values [rows, local groups, capacity, head_dim] per layer, filled up to `length` columns.

    `start` [rows]: the first column of each row's tokens (its left padding). The tensors are made at the
    first write, in the dtype attention computes in (bf16 under autocast)."""

    def __init__(self, *, start: torch.Tensor, capacity: int):
        self.start = start
        self.rows, self.capacity = start.shape[0], capacity
        self.length = 0
        self.keys: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}

    def positions(self, new: int) -> torch.Tensor:
        """The rotary positions [rows, new] of the next `new` columns (0 at each row's first token; pad
        columns get 0 too, they are masked anyway)."""
        if self.length + new > self.capacity:
            raise ValueError(f"the key-value cache holds {self.capacity} tokens; {self.length + new} asked")
        columns = torch.arange(self.length, self.length + new, device=self.start.device)
        return (columns[None, :] - self.start[:, None]).clamp_min(0)

    def attend(self, layer: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
               enable_gqa: bool) -> torch.Tensor:
        """Write the new keys and values of `layer` and return the causal attention of the new queries over
        every filled column of their row. q: [rows, heads, new, d]; k, v: [rows, groups, new, d]."""
        new = q.shape[-2]
        if layer not in self.keys:
            shape = (self.rows, k.shape[1], self.capacity, k.shape[-1])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        end = self.length + new
        keys, values = self.keys[layer], self.values[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        columns = torch.arange(end, device=q.device)
        queries = torch.arange(self.length, end, device=q.device)
        mask = (columns[None, :] <= queries[:, None])[None] & (columns[None, None, :] >= self.start[:, None, None])
        # mask: [rows, new, end]: a query sees its row's tokens up to itself
        return F.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask[:, None],
                                              enable_gqa=enable_gqa)

    def advance(self, new: int) -> None:
        self.length += new

    def select(self, index: torch.Tensor) -> "KVCache":
        """A cache whose row i is row index[i] of this one: one prompt's prefill shared by several samples of it
        (index 0, 0, 0, 1, 1, 1, ...), or padding rows dropped."""
        out = KVCache(start=self.start[index], capacity=self.capacity)
        out.length = self.length
        out.keys = {n: t[index] for n, t in self.keys.items()}
        out.values = {n: t[index] for n, t in self.values.items()}
        return out
