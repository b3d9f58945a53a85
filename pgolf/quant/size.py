"""Quick size accounting of a state dict under the naive baseline's scheme (R0: per-row int8 + fp16, compressed).

This gives an honest byte count before the GPTQ artifact exists: 2-D float tensors with more than 65,536
elements are stored as per-row symmetric int8 (absmax scale, fp16), everything else as fp16; the raw bytes
are compressed with brotli quality 11. The challenge's limit is 16,000,000 bytes (decimal) for model + code.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

BUDGET_BYTES = 16_000_000


def int8_brotli_bytes(state: Mapping[str, Tensor], passthrough_max: int = 65_536) -> int:
    """Compressed bytes of ``state`` under per-row int8 (large 2-D) / fp16 (rest) + brotli-11."""
    import brotli

    chunks = []
    for name in sorted(state):
        t = state[name].detach().float().cpu()
        if t.ndim == 2 and t.numel() > passthrough_max:
            scale = (t.abs().amax(dim=1, keepdim=True) / 127).clamp_min(1e-12)
            q = torch.clamp(torch.round(t / scale), -127, 127).to(torch.int8)
            chunks += [q.numpy().tobytes(), scale.half().numpy().tobytes()]
        else:
            chunks.append(t.half().numpy().tobytes())
    return len(brotli.compress(b"".join(chunks), quality=11))


__all__ = ["BUDGET_BYTES", "int8_brotli_bytes"]
