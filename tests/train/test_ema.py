"""EMA of model weights: against a direct per-tensor loop, dtype handling in copy_to, checkpoint round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pgolf.train.ema import EMA


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4)  # floating buffers + an integer buffer (num_batches_tracked)
        self.low = nn.Parameter(torch.randn(5, 3).bfloat16())
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=g).to(t.dtype))
            else:
                t.add_(1)


def test_ema_matches_direct_loop():
    torch.manual_seed(0)
    m = Toy()
    d = 0.9
    ema = EMA(m, d)
    assert "norm.running_mean" in ema.names and "norm.num_batches_tracked" not in ema.names
    assert "steps" not in ema.names and all(s.dtype == torch.float32 for s in ema.shadow)
    ref = {k: v.double().clone() for k, v in m.state_dict().items() if v.is_floating_point()}
    for step in range(5):
        _perturb(m, step)
        ema.update(m)
        for k, v in m.state_dict().items():
            if k in ref:
                ref[k] = d * ref[k] + (1 - d) * v.double()
    for k, s in ema.state_dict()["shadow"].items():
        assert torch.allclose(s.double(), ref[k], atol=1e-5), k
    # explicit decay override: d = 0 copies the weights
    ema.update(m, decay=0.0)
    for k, s in zip(ema.names, ema.shadow):
        assert torch.equal(s, m.state_dict()[k].float())


def test_ema_copy_to_casts_to_each_dtype():
    torch.manual_seed(1)
    m = Toy()
    ema = EMA(m, 0.5)
    _perturb(m, 7)
    ema.update(m)
    steps_before = m.state_dict()["steps"].clone()
    expected = {k: s.clone() for k, s in zip(ema.names, ema.shadow)}
    ema.copy_to(m)
    sd = m.state_dict()
    assert sd["low"].dtype == torch.bfloat16 and m.low.requires_grad
    assert torch.equal(sd["low"], expected["low"].bfloat16())
    assert torch.equal(sd["lin.weight"], expected["lin.weight"])
    assert torch.equal(sd["steps"], steps_before)  # integer buffers are left alone


def test_ema_state_dict_roundtrip_and_compiled_names():
    torch.manual_seed(2)
    m = Toy()
    ema = EMA(m, 0.99)
    _perturb(m, 3)
    ema.update(m)
    other = EMA(Toy(), 0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.99
    for a, b in zip(ema.shadow, other.shadow):
        assert torch.equal(a, b)

    class Wrapped(nn.Module):  # what torch.compile returns: the module under _orig_mod
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    ema_w = EMA(Wrapped(m), 0.99)
    assert ema_w.names == ema.names
    with pytest.raises(KeyError):
        ema.load_state_dict({"decay": 0.9, "shadow": {"x": torch.zeros(1)}})
    with pytest.raises(ValueError):
        EMA(m, 1.0)
    with pytest.raises(KeyError):
        ema.update(nn.Linear(2, 2))
