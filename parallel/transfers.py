"""Copies between the device and the host that do not make the host wait for the whole stream.

A plain `.cpu()`, `.tolist()` or `.item()` of a CUDA tensor, and a plain copy from pageable host memory
to the device, end with a stream synchronisation: the host stops launching work until the device has
run everything queued so far, and the device then idles until the host catches up. The MoE dispatcher
needs a few integers on the host (the split sizes of its collectives) once per layer; these helpers let
it start that copy early, keep queueing device work, and wait only where the numbers are first used.
On the CPU they are plain tensors (no copy, nothing to wait for), so CPU runs are unchanged.
"""

from __future__ import annotations

import torch


class HostCopy:
    """`tensor`'s values on the host, copied without a stream synchronisation: on CUDA into page-locked memory
    with `non_blocking=True`, an event recorded after the copy. `wait()` blocks the host only until that event,
    that is until the device has run what was queued before the copy, not what is queued after it."""

    def __init__(self, tensor: torch.Tensor):
        self.event = None
        if tensor.device.type == "cuda":
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor

    def wait(self) -> torch.Tensor:
        """The host tensor, once its values have arrived (the only point where the host waits)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None
        return self.host


def to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: on CUDA through page-locked memory with `non_blocking=True`
    (torch keeps the page-locked block until the copy has run). `torch.tensor(..., device="cuda")` and `.to()`
    from pageable memory instead wait for the stream before they return."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
