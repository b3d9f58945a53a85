"""The quantization recipe: which scheme each tensor gets, and :func:`quantize_state` that applies it.

Per tensor (reference-stack 4.4/4.5), by name, in this order:

- a tensor of at most ``passthrough_max`` elements (65,536 in the records): fp16 passthrough, except the attention
  head-gate weights (``blocks.*.attn.gate_w``), which are int8 per row (absmax/127, fp16 scale) when ``gate_int8``;
- a tensor whose name contains one of ``fp16_keep`` (#1499 keeps ``tok_emb`` and ``blocks.9.attn.c_k``): fp16
  (group ``kept``);
- ``tok_emb.weight`` (group ``embed``), ``blocks.*.attn.{c_q,c_k,c_v,proj}.weight`` (``attn``) and
  ``blocks.*.mlp.{fc,proj}.weight`` (``mlp``): the group's bit width, k and scale rule (:mod:`pgolf.quant.scales`:
  ``matrix_scales`` for attention/MLP, ``embed_scales`` for the embedding), rounded by GPTQ when a Hessian is there
  (the tied embedding's comes from the final-norm output; ``embed_gptq`` off rounds it to nearest) and by
  round-to-nearest otherwise or with ``method='rtn'``;
- any other large 2-D tensor (group ``other``): a Linear weight with a Hessian (BigramHash / value-embedding
  projection) as an attention matrix; a table (BigramHash / value-embedding tables) at ``table_bits`` with
  ``table_scales`` (by default the embedding's settings), round-to-nearest;
- anything else: fp16 passthrough.

Optionally LQER (:mod:`pgolf.quant.lqer`) corrects the ``lqer_top`` GPTQ/RTN tensors with the largest error norm.
:func:`quantize_for_artifact` wraps this in the founding records' pruning: magnitude pruning of the weights before
(``prune_frac``) and selective ±1 pruning to a byte target after (``target_bytes``, :mod:`pgolf.quant.prune`).
Every setting is recorded in the artifact's header (``meta.settings``), with what each pruning did.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
from torch import Tensor

from pgolf.quant.artifact import QTensor, QuantizedModel
from pgolf.quant.gptq import absmax_scales, dequantize, gptq_quantize, quantize_rtn
from pgolf.quant.lqer import lqer_delta, lqer_factors
from pgolf.quant.scales import SCALE_RULES, quantize_rows

if TYPE_CHECKING:
    from pgolf.train.config import TrainConfig

_ATTN = re.compile(r"blocks\.\d+\.attn\.(c_q|c_k|c_v|proj)\.weight")
_MLP = re.compile(r"blocks\.\d+\.mlp\.(fc|proj)\.weight")
_GATE = re.compile(r"blocks\.\d+\.attn\.gate_w")
GROUPS = ("embed", "attn", "mlp", "other", "gate", "kept", "passthrough")


@dataclass(frozen=True)
class QuantSettings:
    """Bit widths, k and scale rules per tensor group, and the GPTQ/LQER/pruning knobs (defaults: the 2026-04-27
    record, R6)."""

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
    act_order: str = "descending"  # descending | ascending | none
    inverse: str = "cholesky"     # cholesky | plain (H⁻¹ itself in the column updates)
    lqer_rank: int = 0            # 0 = off (R6: 4)
    lqer_top: int = 3
    lqer_group: int = 64
    matrix_scales: str = "sdclip"  # scale rule of attention/MLP and other Hessian matrices (pgolf.quant.scales)
    embed_scales: str = "sdclip"
    embed_gptq: bool = True
    table_bits: int = 0           # 0: the embedding's bit width, k and rule
    table_scales: str = "embed"
    fp16_keep: str = ""           # comma-separated name substrings kept fp16
    prune_frac: float = 0.0       # magnitude pruning before quantization
    target_bytes: int = 0         # selective ±1 pruning to artifact + code <= this (0 = off)
    calibration: str = "train"    # where the Hessians came from: train | generated

    def __post_init__(self) -> None:
        for g in ("attn", "mlp", "embed"):
            b, k = getattr(self, f"{g}_bits"), getattr(self, f"{g}_k")
            if not 2 <= b <= 8:
                raise ValueError(f"{g} bit width must be in 2..8, got {b}")
            if not k > 0:
                raise ValueError(f"{g} SDClip k must be positive, got {k}")
        if self.method not in ("gptq", "rtn"):
            raise ValueError(f"quant method must be 'gptq' or 'rtn', got {self.method!r}")
        bad = [f"{n}={getattr(self, n)!r}" for n, ok in (
            ("matrix_scales", SCALE_RULES), ("embed_scales", SCALE_RULES), ("table_scales", ("embed",) + SCALE_RULES),
            ("act_order", ("descending", "ascending", "none")), ("inverse", ("cholesky", "plain")),
            ("calibration", ("train", "generated"))) if getattr(self, n) not in ok]
        if self.table_bits and not 2 <= self.table_bits <= 8:
            bad.append(f"table_bits={self.table_bits}")
        if not 0.0 <= self.prune_frac < 1.0 or self.target_bytes < 0:
            bad.append(f"prune_frac={self.prune_frac} / target_bytes={self.target_bytes}")
        if bad:
            raise ValueError("invalid quantization settings: " + ", ".join(bad))

    def recipe(self, group: str) -> tuple[int, float, str]:
        """(bits, k, scale rule) of a quantized group: 'attn', 'mlp', 'embed' or 'table'."""
        if group == "table":
            if self.table_scales == "embed":
                return self.recipe("embed")
            return self.table_bits or self.embed_bits, self.embed_k, self.table_scales
        rule = self.embed_scales if group == "embed" else self.matrix_scales
        return getattr(self, f"{group}_bits"), getattr(self, f"{group}_k"), rule

    def kept(self, name: str) -> bool:
        return any(p and p in name for p in self.fp16_keep.split(","))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_train_config(cls, cfg: TrainConfig) -> "QuantSettings":
        """Settings from a TrainConfig's ``quant_*``, ``gptq_*`` and ``lqer_*`` fields."""
        method = cfg.quant_method if cfg.quant_method in ("gptq", "rtn") else "gptq"
        return cls(attn_bits=cfg.quant_attn_bits, attn_k=cfg.quant_attn_k, mlp_bits=cfg.quant_mlp_bits,
                   mlp_k=cfg.quant_mlp_k, embed_bits=cfg.quant_embed_bits, embed_k=cfg.quant_embed_k,
                   gate_int8=cfg.quant_gate_int8, passthrough_max=cfg.quant_passthrough_max, method=method,
                   block_size=cfg.gptq_block_size, damp=cfg.gptq_damp, act_order=cfg.gptq_act_order,
                   inverse=cfg.gptq_inverse, lqer_rank=cfg.lqer_rank, lqer_top=cfg.lqer_top,
                   matrix_scales=cfg.quant_matrix_scales, embed_scales=cfg.quant_embed_scales,
                   embed_gptq=cfg.quant_embed_gptq, table_bits=cfg.quant_table_bits,
                   table_scales=cfg.quant_table_scales, fp16_keep=cfg.quant_fp16_keep,
                   prune_frac=cfg.quant_prune_frac, target_bytes=cfg.quant_target_bytes,
                   calibration=cfg.gptq_calibration)


def tensor_group(name: str, t: Tensor, s: QuantSettings) -> str:
    """The group (see the module docstring) that decides ``name``'s scheme."""
    if _GATE.fullmatch(name) and s.gate_int8 and t.ndim == 2:
        return "gate"
    if t.numel() <= s.passthrough_max or t.ndim != 2 or not t.is_floating_point():
        return "passthrough"
    if s.kept(name):
        return "kept"
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
    if group in ("passthrough", "kept"):
        return "fp16"
    return group


def quantize_for_artifact(state: Mapping[str, Tensor], hessians: Mapping[str, Tensor] | None,
                          settings: QuantSettings, *, code_bytes: int = 0, log: Callable[[str], None] | None = None,
                          **kw: Any) -> QuantizedModel:
    """Magnitude pruning (``prune_frac``), :func:`quantize_state`, then selective ±1 pruning until the artifact plus
    ``code_bytes`` fit ``target_bytes``; what each pruning did goes into the header's meta. ``kw``: as
    :func:`quantize_state`."""
    from pgolf.quant.prune import magnitude_prune, selective_prune

    pruned = None
    if settings.prune_frac:
        state, pruned = magnitude_prune(state, settings.prune_frac)
        if log:
            log(f"magnitude_prune: {sum(pruned.values()):,} weights zeroed in {len(pruned)} tensors "
                f"({settings.prune_frac:.1%} of each 2-D tensor over 65,536 elements)")
    qm = quantize_state(state, hessians, settings, log=log, **kw)
    if pruned is not None:
        qm.meta["magnitude_prune"] = {"frac": settings.prune_frac, "zeroed": sum(pruned.values())}
    if settings.target_bytes:
        qm.meta["selective_prune"] = selective_prune(qm, settings.target_bytes, code_bytes, log=log)
    return qm


@torch.no_grad()
def quantize_state(state: Mapping[str, Tensor], hessians: Mapping[str, Tensor] | None, settings: QuantSettings,
                   *, model_config: Mapping[str, Any] | None = None, layout: str = "int8",
                   meta: Mapping[str, Any] | None = None,
                   log: Callable[[str], None] | None = None) -> QuantizedModel:
    """Quantize a state dict (names → fp tensors) with the Hessians from :mod:`pgolf.quant.calibrate`."""
    hessians = hessians or {}
    t0 = time.perf_counter()
    tensors: list[QTensor] = []
    originals: dict[str, Tensor] = {}
    for name, t in state.items():
        t = t.detach()
        group = tensor_group(name, t, settings)
        qt = _quantize_tensor(name, t, group, hessians.get(name), settings)
        if qt.scheme == "int" and group != "gate":
            originals[name] = t
        tensors.append(qt)
    if settings.lqer_rank > 0 and originals:
        _lqer(tensors, originals, settings, log)
    qm = QuantizedModel(dict(model_config or {}), tensors, layout=layout,
                        meta={"settings": settings.to_dict(), **dict(meta or {})})
    if log:
        n_int = sum(1 for qt in tensors if qt.scheme == "int")
        log(f"quantized {n_int} tensors ({sum(1 for qt in tensors if qt.method == 'gptq')} GPTQ) and "
            f"{len(tensors) - n_int} fp16 passthrough in {time.perf_counter() - t0:.1f}s")
    return qm


def _quantize_tensor(name: str, t: Tensor, group: str, H: Tensor | None, s: QuantSettings) -> QTensor:
    """One tensor's QTensor under its group's scheme."""
    dtype = str(t.dtype).replace("torch.", "")
    role = stream_role(name, group)
    if group in ("passthrough", "kept"):
        return QTensor(name, tuple(t.shape), dtype, "fp16", group, role, data=t.to(torch.float16))
    if group == "gate":
        scale = absmax_scales(t, 8)
        return QTensor(name, tuple(t.shape), dtype, "int", group, role, bits=8, method="absmax",
                       q=quantize_rtn(t, scale, 8), scale=scale)
    kind = "table" if group == "other" and H is None else "attn" if group == "other" else group
    bits, k, rule = s.recipe(kind)
    use_gptq = s.method == "gptq" and H is not None and (group != "embed" or s.embed_gptq)
    gptq = None
    if use_gptq:
        def gptq(scale):
            return gptq_quantize(t.float(), H.to(t.device), bits, k, block_size=s.block_size, damp=s.damp,
                                 act_order=s.act_order, inverse=s.inverse, scale=scale)
    q, scale = quantize_rows(t, rule, bits, k, gptq)
    return QTensor(name, tuple(t.shape), dtype, "int", group, role, bits=bits,
                   k=float(k) if rule.startswith("sdclip") else None, method="gptq" if use_gptq else "rtn",
                   q=q, scale=scale)


def _lqer(tensors: list[QTensor], originals: dict[str, Tensor], s: QuantSettings, log) -> None:
    """LQER factors on the ``lqer_top`` quantized tensors with the largest error norm (in place)."""
    by_name = {qt.name: qt for qt in tensors}
    errors = {n: float(torch.linalg.norm(t.float() - dequantize(by_name[n].q, by_name[n].scale)))
              for n, t in originals.items()}
    for name in sorted(errors, key=lambda n: (-errors[n], n))[: s.lqer_top]:
        qt = by_name[name]
        E = originals[name].float() - dequantize(qt.q, qt.scale)
        qt.lqer = lqer_factors(E, s.lqer_rank, s.lqer_group)
        if log:
            log(f"lqer: {name} rank {qt.lqer['rank']} ‖E‖_F {errors[name]:.4f} -> "
                f"{float(torch.linalg.norm(E - lqer_delta(qt.lqer))):.4f}")


__all__ = ["GROUPS", "QuantSettings", "quantize_for_artifact", "quantize_state", "stream_role", "tensor_group"]
