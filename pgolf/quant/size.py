"""Size accounting: the artifact's per-stream table, the 16,000,000-byte budget check, and a quick R0-style estimate.

- :func:`artifact_size_table` / :func:`format_size_table`: rows per compressed stream (plus the container) that sum
  to the artifact file's size; :func:`check_budget` raises :class:`OverBudgetError` naming the excess and the knob
  (SDClip k or bit width per group) estimated to fix it.
- :func:`int8_brotli_bytes`: the naive baseline's scheme (R0: per-row int8 + fp16, compressed), for a quick estimate.
  2-D float tensors with more than 65,536 elements as per-row symmetric int8 (absmax scale, fp16), everything
  else as fp16, brotli quality 11.

The challenge's limit is 16,000,000 bytes (decimal) for model + code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from pgolf.errors import UserError

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


# ---- the artifact's size table and the budget check -------------------------------------------------------------


KNOB_GROUPS = ("embed", "attn", "mlp")


@dataclass(frozen=True)
class SizeRow:
    """One row of the size table: a compressed stream of the artifact (or the container itself)."""

    group: str
    tensors: int
    params: int
    bytes: int

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.bytes / self.params if self.params else float("nan")


def artifact_size_table(source) -> list[SizeRow]:
    """Rows (one per compressed stream, plus ``container``: magic, version, lengths, checksum and the compressed
    JSON header) whose bytes sum exactly to the artifact's size. ``source``: the artifact bytes or a path."""
    from pgolf.quant.artifact import PREFIX_BYTES, read_header

    blob = source if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb").read()
    header, offset = read_header(bytes(blob), source="artifact")
    per_stream: dict[str, list[int]] = {}
    for e in header["tensors"]:
        n = math.prod(e["shape"])
        row = per_stream.setdefault(e["stream"], [0, 0])
        row[0] += 1
        row[1] += n
        if e.get("lqer"):
            r, (N, K) = e["lqer"]["rank"], e["shape"]
            lq = per_stream.setdefault("lqer", [0, 0])
            lq[0] += 1
            lq[1] += r * (N + K)
    rows = [SizeRow("container", 0, 0, offset)]
    assert offset >= PREFIX_BYTES
    for s in header["streams"]:
        t, p = per_stream.get(s["name"], (0, 0))
        rows.append(SizeRow(s["name"], t, p, int(s["bytes"])))
    return rows


def format_size_table(rows: list[SizeRow], code_bytes: int | None = None, budget: int = BUDGET_BYTES) -> str:
    """The size table as text: per stream, the model total, the code and the total against the budget."""
    lines = [f"{'group':<12} {'tensors':>7} {'params':>12} {'bytes':>12} {'bits/w':>7}"]
    for r in rows:
        bpw = f"{r.bits_per_weight:7.3f}" if r.params else f"{'':>7}"
        lines.append(f"{r.group:<12} {r.tensors:>7} {r.params:>12,} {r.bytes:>12,} {bpw}")
    model = sum(r.bytes for r in rows)
    params = sum(r.params for r in rows if r.group != "lqer")
    lines.append(f"{'model':<12} {sum(r.tensors for r in rows if r.group != 'lqer'):>7} {params:>12,} "
                 f"{model:>12,} {8.0 * model / max(params, 1):7.3f}")
    if code_bytes is not None:
        total = model + code_bytes
        lines.append(f"{'code':<12} {'':>7} {'':>12} {code_bytes:>12,}")
        state = f"headroom {budget - total:,}" if total <= budget else f"OVER by {total - budget:,}"
        lines.append(f"{'total':<12} {'':>7} {'':>12} {total:>12,}  of {budget:,} ({state})")
    return "\n".join(lines)


class OverBudgetError(UserError, ValueError):
    """The artifact plus code exceed the 16,000,000-byte limit; the message says by how much and what to change."""


def knob_groups(header_tensors: list[dict]) -> dict[str, dict]:
    """{embed|attn|mlp: {params, bits, k}} of the integer tensors in an artifact header's tensor list."""
    out: dict[str, dict] = {}
    for e in header_tensors:
        if e.get("scheme") != "int" or e.get("group") not in KNOB_GROUPS:
            continue
        g = out.setdefault(e["group"], {"params": 0, "bits": e.get("bits"), "k": e.get("k")})
        g["params"] += math.prod(e["shape"])
    return out


def budget_advice(excess: int, groups: dict[str, dict]) -> list[str]:
    """Knob changes each estimated to save ``excess`` bytes, from bits/weight ≈ b − log2 k + const (R2's relation):
    raising k by a factor f saves about params·log2(f)/8 bytes; one bit less at the same k about params/8."""
    tips = []
    for name in ("mlp", "attn", "embed"):
        g = groups.get(name)
        if not g or not g["params"] or g.get("k") is None:
            continue
        f = 2.0 ** (8.0 * excess * 1.02 / g["params"])  # 2% margin: the relation is approximate
        tips.append(f"raise {name} k {g['k']:g} -> {g['k'] * f:.2f} (--quant-{name}-k; "
                    f"{g['params']:,} weights at int{g['bits']})")
    for name in ("mlp", "attn", "embed"):
        g = groups.get(name)
        if g and g["params"] and g.get("bits") and g["bits"] > 2 and g["params"] / 8 >= excess:
            tips.append(f"or lower {name} to int{g['bits'] - 1} (--quant-{name}-bits {g['bits'] - 1}; saves about "
                        f"{g['params'] / 8:,.0f} bytes at the same k)")
            break
    return tips


def check_budget(model_bytes: int, code_bytes: int, groups: dict[str, dict] | None = None,
                 budget: int = BUDGET_BYTES) -> int:
    """Headroom ``budget − (model + code)``; raises :class:`OverBudgetError` with the fix when it is negative."""
    total = model_bytes + code_bytes
    if total <= budget:
        return budget - total
    excess = total - budget
    msg = (f"artifact over budget: {total:,} bytes (model {model_bytes:,} + code {code_bytes:,}) exceed "
           f"{budget:,} by {excess:,} bytes")
    tips = budget_advice(excess, groups or {})
    if tips:
        msg += ". Estimated fixes, any one of: " + "; ".join(tips)
    raise OverBudgetError(msg)


__all__ += ["SizeRow", "artifact_size_table", "format_size_table", "OverBudgetError", "knob_groups",
            "budget_advice", "check_budget", "KNOB_GROUPS"]
