"""The founding records' two prunings: magnitude pruning of the weights before quantization, and selective ±1
pruning of the quantized values until the artifact fits a byte target.

- :func:`magnitude_prune` (#490: 2%, #1499: 3%): in every 2-D floating tensor of more than 65,536 elements (the
  embedding included), the weights whose magnitude is below the ``frac``-quantile of the tensor's magnitudes are
  set to 0.
- :func:`selective_prune` (#1406: 15.9 MiB, #1550: 15.22 MiB): every quantized attention/MLP value equal to ±1 is
  a candidate, cheapest first by its row's scale² (the squared error of zeroing it; ties in tensor and index
  order); a binary search finds the fewest candidates whose zeroing brings the encoded artifact plus the code to
  at most the target. If even all of them are not enough, all are zeroed and the result says so. #1550 searched
  from an estimate upward instead of bisecting; the target is met either way.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch
from torch import Tensor

PRUNE_MIN_NUMEL = 65_536


@torch.no_grad()
def magnitude_prune(state: Mapping[str, Tensor], frac: float) -> tuple[dict[str, Tensor], dict[str, int]]:
    """(state with the pruned tensors replaced by pruned copies, {name: weights zeroed}); ``state`` is unchanged."""
    if not 0.0 <= frac < 1.0:
        raise ValueError(f"magnitude pruning fraction must be in [0, 1), got {frac}")
    out, zeroed = dict(state), {}
    for name, t in state.items():
        if t.ndim != 2 or not t.is_floating_point() or t.numel() <= PRUNE_MIN_NUMEL:
            continue
        a = t.detach().abs().float()
        threshold = torch.quantile(a.flatten(), frac) if a.numel() <= 2 ** 24 else _kth(a, frac)
        small = a < threshold
        out[name] = t.detach().masked_fill(small, 0.0)
        zeroed[name] = int(small.sum())
    return out, zeroed


def selective_prune(qm, target_bytes: int, code_bytes: int, *, log: Callable[[str], None] | None = None,
                    encode: Callable | None = None) -> dict:
    """Zero the fewest ±1 attention/MLP values of ``qm`` (in place) so that encode(qm) + code_bytes <= target_bytes.

    Returns {'candidates', 'pruned', 'bytes_before', 'bytes_after', 'target', 'fits'}."""
    from pgolf.quant.artifact import encode as encode_artifact

    encode = encode or encode_artifact
    owners, flat, order = _candidates(qm)

    def size(n: int) -> int:
        return len(encode(_with_zeros(qm, owners, flat, order[:n]))) + code_bytes

    n_cand, before = len(order), size(0)
    if before <= target_bytes:
        n, after = 0, before
    elif size(n_cand) > target_bytes:
        n, after = n_cand, size(n_cand)
    else:
        lo, hi = 0, n_cand
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if size(mid) <= target_bytes else (mid + 1, hi)
        n, after = lo, size(lo)
    _zero(qm, owners, flat, order[:n])
    info = dict(candidates=n_cand, pruned=n, bytes_before=before, bytes_after=after, target=target_bytes,
                fits=after <= target_bytes)
    if log:
        log(f"selective_prune: {n:,}/{n_cand:,} ±1 values zeroed; artifact+code {before:,} -> {after:,} bytes "
            f"(target {target_bytes:,}{'' if info['fits'] else ', NOT met even with every candidate'})")
    return info


def _candidates(qm) -> tuple[list[int], Tensor, Tensor]:
    """(tensor index per candidate, flat index per candidate, candidate order cheapest first)."""
    owners, flats, keys = [], [], []
    for i, qt in enumerate(qm.tensors):
        if qt.scheme != "int" or qt.group not in ("attn", "mlp"):
            continue
        ones = qt.q.reshape(-1).abs() == 1
        idx = ones.nonzero().flatten()
        rows = idx // qt.shape[1]
        owners.append(torch.full_like(idx, i))
        flats.append(idx)
        keys.append(qt.scale.double()[rows] ** 2)
    if not flats:
        empty = torch.zeros(0, dtype=torch.long)
        return [], empty, empty
    keys_all = torch.cat(keys)
    return torch.cat(owners).tolist(), torch.cat(flats), torch.argsort(keys_all, stable=True)


def _with_zeros(qm, owners, flat: Tensor, chosen: Tensor):
    """A shallow copy of ``qm`` whose tensors touched by ``chosen`` are copies with those values zeroed."""
    tensors = list(qm.tensors)
    for i, idx in _by_tensor(owners, flat, chosen).items():
        q = tensors[i].q.clone()
        q.view(-1)[idx] = 0
        tensors[i] = dataclasses.replace(tensors[i], q=q, q_packed=None)
    return dataclasses.replace(qm, tensors=tensors)


def _zero(qm, owners, flat: Tensor, chosen: Tensor) -> None:
    for i, idx in _by_tensor(owners, flat, chosen).items():
        qm.tensors[i].q.view(-1)[idx] = 0
        qm.tensors[i].q_packed = None


def _by_tensor(owners, flat: Tensor, chosen: Tensor) -> dict[int, Tensor]:
    if not len(chosen):
        return {}
    own = torch.as_tensor(owners)[chosen]
    return {int(i): flat[chosen][own == i] for i in torch.unique(own)}


def _kth(a: Tensor, frac: float) -> Tensor:
    """torch.quantile's linear-interpolation quantile for tensors too large for it."""
    v = a.flatten().sort().values
    pos = frac * (v.numel() - 1)
    lo = int(pos)
    return v[lo] + (v[min(lo + 1, v.numel() - 1)] - v[lo]) * (pos - lo)


__all__ = ["PRUNE_MIN_NUMEL", "magnitude_prune", "selective_prune"]
