"""The quantization recipe: which scheme each tensor gets, and :func:`quantize_state` that applies it.

Per tensor (reference-stack 4.4/4.5), by name, in this order:

- a tensor of at most ``passthrough_max`` elements (65,536 in the records): fp16 passthrough, except the attention
  head-gate weights (``blocks.*.attn.gate_w``), which are int8 per row (absmax/127, fp16 scale) when ``gate_int8``;
- ``tok_emb.weight`` (group ``embed``), ``blocks.*.attn.{c_q,c_k,c_v,proj}.weight`` (``attn``) and
  ``blocks.*.mlp.{fc,proj}.weight`` (``mlp``): GPTQ with SDClip scales at the group's bit width and k (the tied
  embedding's Hessian comes from the final-norm output); RTN with the same scales when a Hessian is missing or
  ``method='rtn'``;
- any other large 2-D tensor (group ``other``: BigramHash / value-embedding tables and projections): GPTQ if it has a
  Hessian (a Linear), else RTN, at the ``attn`` settings for Linear weights and the ``embed`` settings for tables;
- anything else: fp16 passthrough.

Optionally LQER (:mod:`pgolf.quant.lqer`) corrects the ``lqer_top`` GPTQ/RTN tensors with the largest error norm.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from pgolf.quant.artifact import QTensor, QuantizedModel
from pgolf.quant.gptq import absmax_scales, dequantize, gptq_quantize, quantize_rtn, sdclip_scales
from pgolf.quant.lqer import lqer_delta, lqer_factors

_ATTN = re.compile(r"blocks\.\d+\.attn\.(c_q|c_k|c_v|proj)\.weight")
_MLP = re.compile(r"blocks\.\d+\.mlp\.(fc|proj)\.weight")
_GATE = re.compile(r"blocks\.\d+\.attn\.gate_w")
GROUPS = ("embed", "attn", "mlp", "other", "gate", "passthrough")


@dataclass(frozen=True)
class QuantSettings:
    """Bit widths and SDClip k per tensor group, and the GPTQ/LQER knobs (defaults: the 2026-04-27 record, R6)."""

    attn_bits: int = 6
    attn_k: float = 13.0
    mlp_bits: int = 6
    mlp_k: float = 11.5
    embed_bits: int = 7
    embed_k: float = 14.0
    gate_int8: bool = True
    passthrough_max: int = 65_536
    method: str = "gptq"          # gptq | rtn
    block_size: int = 128
    damp: float = 0.01
    act_order: bool = True
    lqer_rank: int = 0            # 0 = off (R6: 4)
    lqer_top: int = 3
    lqer_group: int = 64

    def __post_init__(self) -> None:
        for g in ("attn", "mlp", "embed"):
            b, k = getattr(self, f"{g}_bits"), getattr(self, f"{g}_k")
            if not 2 <= b <= 8:
                raise ValueError(f"{g} bit width must be in 2..8, got {b}")
            if not k > 0:
                raise ValueError(f"{g} SDClip k must be positive, got {k}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"quant method must be 'gptq' or 'rtn', got {self.method!r}")

    def bits_k(self, group: str) -> tuple[int, float]:
        return getattr(self, f"{group}_bits"), getattr(self, f"{group}_k")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_train_config(cls, cfg: Any) -> "QuantSettings":
        """Settings from a TrainConfig's ``quant_*``, ``gptq_*`` and ``lqer_*`` fields."""
        method = cfg.quant_method if cfg.quant_method in ("gptq", "rtn") else "gptq"
        return cls(attn_bits=cfg.quant_attn_bits, attn_k=cfg.quant_attn_k, mlp_bits=cfg.quant_mlp_bits,
                   mlp_k=cfg.quant_mlp_k, embed_bits=cfg.quant_embed_bits, embed_k=cfg.quant_embed_k,
                   gate_int8=cfg.quant_gate_int8, passthrough_max=cfg.quant_passthrough_max, method=method,
                   block_size=cfg.gptq_block_size, damp=cfg.gptq_damp, lqer_rank=cfg.lqer_rank,
                   lqer_top=cfg.lqer_top)


def tensor_group(name: str, t: Tensor, s: QuantSettings) -> str:
    """The group (see the module docstring) that decides ``name``'s scheme."""
    if _GATE.fullmatch(name) and s.gate_int8 and t.ndim == 2:
        return "gate"
    if t.numel() <= s.passthrough_max or t.ndim != 2 or not t.is_floating_point():
        return "passthrough"
    if name == "tok_emb.weight":
        return "embed"
    if _ATTN.fullmatch(name):
        return "attn"
    if _MLP.fullmatch(name):
        return "mlp"
    return "other"


def stream_role(name: str, group: str) -> str:
    """Which compressed stream of the artifact holds this tensor's values (per role, as R6's per-group streams)."""
    if group == "embed":
        return "tok_emb"
    if group in ("attn", "mlp"):
        return name.split(".", 2)[2].rsplit(".", 1)[0]  # attn.c_q, mlp.fc, ...
    if group == "passthrough":
        return "fp16"
    return group


@torch.no_grad()
def quantize_state(state: Mapping[str, Tensor], hessians: Mapping[str, Tensor] | None, settings: QuantSettings,
                   *, model_config: Mapping[str, Any] | None = None, layout: str = "int8",
                   meta: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] | None = None) -> QuantizedModel:
    """Quantize a state dict (names → fp tensors) with the Hessians from :mod:`pgolf.quant.calibrate`."""
    hessians = hessians or {}
    t0 = time.perf_counter()
    tensors: list[QTensor] = []
    errors: dict[str, float] = {}
    originals: dict[str, Tensor] = {}
    for name, t in state.items():
        t = t.detach()
        group = tensor_group(name, t, settings)
        dtype = str(t.dtype).replace("torch.", "")
        role = stream_role(name, group)
        if group == "passthrough":
            tensors.append(QTensor(name, tuple(t.shape), dtype, "fp16", group, role, data=t.to(torch.float16)))
            continue
        if group == "gate":
            scale = absmax_scales(t, 8)
            q = quantize_rtn(t, scale, 8)
            tensors.append(QTensor(name, tuple(t.shape), dtype, "int", group, role, bits=8, method="absmax",
                                   q=q, scale=scale))
            continue
        is_table = group == "other" and name not in hessians
        bits, k = settings.bits_k("embed" if group == "embed" or is_table else
                                  "attn" if group == "other" else group)
        H = hessians.get(name)
        if settings.method == "gptq" and H is not None:
            q, scale = gptq_quantize(t.float(), H.to(t.device), bits, k, block_size=settings.block_size,
                                     damp=settings.damp, act_order=settings.act_order)
            method = "gptq"
        else:
            scale = sdclip_scales(t, bits, k)
            q = quantize_rtn(t, scale, bits)
            method = "rtn"
        qt = QTensor(name, tuple(t.shape), dtype, "int", group, role, bits=bits, k=float(k), method=method,
                     q=q, scale=scale)
        errors[name] = float(torch.linalg.norm(t.float() - dequantize(q, scale)))
        originals[name] = t
        tensors.append(qt)
    if settings.lqer_rank > 0 and errors:
        by_name = {qt.name: qt for qt in tensors}
        top = sorted(errors, key=lambda n: (-errors[n], n))[: settings.lqer_top]
        for name in top:
            qt = by_name[name]
            E = originals[name].float() - dequantize(qt.q, qt.scale)
            qt.lqer = lqer_factors(E, settings.lqer_rank, settings.lqer_group)
            after = float(torch.linalg.norm(E - lqer_delta(qt.lqer)))
            if log:
                log(f"lqer: {name} rank {qt.lqer['rank']} ‖E‖_F {errors[name]:.4f} -> {after:.4f}")
    qm = QuantizedModel(dict(model_config or {}), tensors, layout=layout,
                        meta={"settings": settings.to_dict(), **dict(meta or {})})
    if log:
        n_int = sum(1 for qt in tensors if qt.scheme == "int")
        log(f"quantized {n_int} tensors ({sum(1 for qt in tensors if qt.method == 'gptq')} GPTQ) and "
            f"{len(tensors) - n_int} fp16 passthrough in {time.perf_counter() - t0:.1f}s")
    return qm


__all__ = ["GROUPS", "QuantSettings", "quantize_state", "stream_role", "tensor_group"]
