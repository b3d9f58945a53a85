"""Late QAT: from the step the LR multiplier drops below a threshold, chosen Linear weights run through a
straight-through fake quantization at their artifact bit width (:func:`pgolf.model.gpt.fake_quantize`, switched by
:meth:`pgolf.model.gpt.GPT.set_fake_quant`).

Which weights (``scope``), :func:`qat_targets`:

- 'matrices': every :class:`pgolf.model.gpt.Linear` whose weight has more than ``passthrough_max`` elements (#1499
  fake-quantizes every CastedLinear over 8,192 elements, its passthrough size), MLP weights at the MLP bit width and
  the others at the attention bit width;
- 'aux': the BigramHash and value-embedding projections only, at the attention bit width: what the banked 2026-03
  records (#1148, #1406, #1550) fake-quantize, since only their CastedLinear layers have the hook.

By default it acts in training mode only, so calibration and every evaluation (``model.eval()``) see the real
weights. ``late_qat_in_eval`` keeps it on everywhere, as #1499's code does (its flag is never reset); an artifact
written so records the targets (``meta.fake_quant_in_eval``) and its rebuilt model applies them too.
"""

from __future__ import annotations

from torch import nn

from pgolf.model.gpt import Linear


def qat_targets(model: nn.Module, scope: str, *, passthrough_max: int, attn_bits: int,
                mlp_bits: int) -> dict[str, int]:
    """{module name: bit width} of the Linear layers late QAT fake-quantizes under ``scope``."""
    if scope not in ("matrices", "aux"):
        raise ValueError(f"late QAT scope must be 'matrices' or 'aux', got {scope!r}")
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, Linear):
            continue
        if scope == "aux":
            if name in ("bigram.proj", "ve.proj"):
                out[name] = attn_bits
        elif mod.weight.numel() > passthrough_max:
            out[name] = mlp_bits if ".mlp." in name else attn_bits
    return out
