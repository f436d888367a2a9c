"""Many small host arrays sent to the device in one copy, handed back as typed views of that one buffer.

Why: the device halves (device_augment.py, erasing.py) plan a batch on the host (which samples take which op,
their tables and arguments, the erasing boxes) and need those numbers on the device. One copy instead of
one per array keeps the launches few, and the copy comes from pinned memory: a copy from pageable memory
may wait for everything queued on the stream before it, which would stall the host behind the device.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 8  # every array starts at a multiple of the widest element, so each view keeps its dtype


class HostArrays:
    """`add` numpy arrays, then `upload(device)` returns them as tensors on `device`, in the order added."""

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []

    def add(self, array) -> int:
        """Queue `array` (any numpy dtype torch has); returns its index in `upload`'s list."""
        self.arrays.append(np.ascontiguousarray(array))
        return len(self.arrays) - 1

    def upload(self, device: torch.device) -> list[torch.Tensor]:
        offsets, size = [], 0
        for array in self.arrays:
            offsets.append(size)
            size += -(-array.nbytes // _ALIGN) * _ALIGN
        buffer = np.empty(size, dtype=np.uint8)
        for offset, array in zip(offsets, self.arrays):
            buffer[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        host = torch.from_numpy(buffer)
        if device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(device, non_blocking=True)
        return [
            flat[offset : offset + array.nbytes].view(_TORCH_DTYPES[array.dtype]).view(array.shape)
            for offset, array in zip(offsets, self.arrays)
        ]


_TORCH_DTYPES = {
    np.dtype(np.bool_): torch.bool,
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
}
