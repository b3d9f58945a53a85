"""The one dispatch point between the model and its hot-spot ops.

The model calls ``pgolf.kernels.<op>(...)`` and never imports Triton. For each op this module picks an
implementation per call from the tensors' device and the selected backend:

- ``reference``: the pure-PyTorch code in :mod:`pgolf.kernels.reference` (always available, every device);
- ``triton``: a fused Triton kernel registered by its op module (CUDA, or CPU under ``TRITON_INTERPRET=1``).

The backend comes from ``PGOLF_KERNELS`` (``auto`` by default: Triton on CUDA where an op has a Triton
implementation, otherwise the reference), may be set per op with ``PGOLF_KERNELS_<OP>`` (e.g.
``PGOLF_KERNELS_MLP=reference``), and can be overridden in code with :func:`use_backend`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import types
from typing import Callable, Iterator

from torch import Tensor

from pgolf.kernels import reference

OPS = ("attention", "mlp", "softcap_ce", "lm_head_loss", "newton_schulz", "int6_matmul")
BACKENDS = ("auto", "reference", "triton")

_IMPLS: dict[str, dict[str, Callable]] = {op: {"reference": getattr(reference, op)} for op in OPS}
_OVERRIDE: dict[str | None, str] = {}
# Modules holding each op's Triton kernels; imported only when the Triton backend is wanted, and they call
# register(op, "triton", fn) at import. Importing Triton kernels on CPU needs TRITON_INTERPRET=1 set first.
TRITON_MODULES = {
    "attention": "pgolf.kernels.xsa_attention",
    "mlp": "pgolf.kernels.mlp",
    "softcap_ce": "pgolf.kernels.softcap_ce",
    "lm_head_loss": "pgolf.kernels.softcap_ce",
    "newton_schulz": "pgolf.kernels.newton_schulz",
    "int6_matmul": "pgolf.kernels.int6_matmul",
}
_IMPORT_ERRORS: dict[str, str] = {}


def register(op: str, backend: str, fn: Callable) -> None:
    """Register ``fn`` as ``backend``'s implementation of ``op`` (called by the Triton op modules)."""
    if op not in _IMPLS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    _IMPLS[op][backend] = fn


def selected_backend(op: str) -> str:
    """The backend name configured for ``op`` (before device resolution): override, env per op, env, 'auto'."""
    name = _OVERRIDE.get(op) or _OVERRIDE.get(None) or os.environ.get(f"PGOLF_KERNELS_{op.upper()}") \
        or os.environ.get("PGOLF_KERNELS", "auto")
    if name not in BACKENDS:
        raise ValueError(f"PGOLF_KERNELS{'_' + op.upper() if op else ''}={name!r} is not a backend; "
                         f"choose one of {', '.join(BACKENDS)}")
    return name


def implementation(op: str, device_type: str) -> tuple[str, Callable]:
    """(backend, function) that runs ``op`` for tensors on ``device_type`` ('cpu', 'cuda', ...)."""
    name = selected_backend(op)
    impls = _IMPLS[op]
    if name == "triton" or (name == "auto" and device_type == "cuda"):
        _load_triton(op)
    if name == "auto":
        name = "triton" if device_type == "cuda" and "triton" in impls else "reference"
    if name not in impls:
        why = f" ({_IMPORT_ERRORS[op]})" if op in _IMPORT_ERRORS else ""
        raise RuntimeError(f"op {op!r} has no {name!r} implementation{why} (available: {', '.join(sorted(impls))}); "
                           f"set PGOLF_KERNELS=reference or PGOLF_KERNELS_{op.upper()}=reference")
    return name, impls[name]


def _load_triton(op: str) -> None:
    """Import the op's Triton module once (it registers itself); remember why if that fails."""
    if "triton" in _IMPLS[op] or op in _IMPORT_ERRORS:
        return
    import importlib

    try:
        importlib.import_module(TRITON_MODULES[op])
    except ModuleNotFoundError as e:
        if e.name not in (TRITON_MODULES[op], "triton"):
            raise
        _IMPORT_ERRORS[op] = f"{e.name} is not available"


@contextlib.contextmanager
def use_backend(backend: str, op: str | None = None) -> Iterator[None]:
    """Force ``backend`` for one op (or all ops when ``op`` is None) inside the ``with`` block."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    prev = _OVERRIDE.get(op)
    _OVERRIDE[op] = backend
    try:
        yield
    finally:
        if prev is None:
            _OVERRIDE.pop(op, None)
        else:
            _OVERRIDE[op] = prev


def preload(device_type: str = "cuda") -> dict[str, str]:
    """Import the Triton modules the selected backends will use on ``device_type``; returns op → backend.

    Call before ``torch.compile``: the lazy import inside a traced dispatch call is not traceable.
    """
    return {op: implementation(op, device_type)[0] for op in OPS}


class _KernelsPackage(types.ModuleType):
    """This package's module type: the op names always stay bound to the dispatch functions.

    Importing a submodule binds it on its parent package under its own name, and four op modules share their
    op's name (``pgolf.kernels.mlp`` ...): without this guard that import would replace the function the model
    calls with a module. Reach an op module with ``importlib.import_module("pgolf.kernels.mlp")`` or
    ``from pgolf.kernels.mlp import ...``.
    """

    def __setattr__(self, name: str, value) -> None:
        if name in OPS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


# --------------------------------------------------------------------------------------------------------
# The ops. Signatures and shapes are documented on the reference implementations.

def attention(q: Tensor, k: Tensor, v: Tensor, *, xsa: bool = False, cu_seqlens: Tensor | None = None,
              max_seqlen: int | None = None) -> Tensor:
    """Causal GQA attention (+XSA). q: (B,T,Hq,D), k/v: (B,T,Hkv,D) → (B,T,Hq,D). See reference.attention."""
    return implementation("attention", q.device.type)[1](q, k, v, xsa=xsa, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


def mlp(x: Tensor, w1: Tensor, w2: Tensor, negative_slope: float = 0.5) -> Tensor:
    """LeakyReLU_s(x W1ᵀ)² W2ᵀ. x: (..., d), w1: (hidden, d), w2: (d, hidden) → (..., d)."""
    return implementation("mlp", x.device.type)[1](x, w1, w2, negative_slope)


def softcap_ce(z: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Per-token CE of cap·tanh(z/cap). z: (N, V), targets: (N,) → (N,) fp32."""
    return implementation("softcap_ce", z.device.type)[1](z, targets, cap)


def lm_head_loss(h: Tensor, weight: Tensor, targets: Tensor, cap: float) -> Tensor:
    """Tied head + softcapped CE. h: (N, d), weight: (V, d), targets: (N,) → (N,) fp32."""
    return implementation("lm_head_loss", h.device.type)[1](h, weight, targets, cap)


def newton_schulz(G: Tensor, coefficients, steps: int = 5, eps: float = 1e-7, dtype=None) -> Tensor:
    """Batched Newton-Schulz orthogonalization. G: (m, n) or (B, m, n) → same shape in ``dtype``."""
    import torch

    dtype = dtype or (torch.bfloat16 if G.device.type == "cuda" else torch.float32)
    return implementation("newton_schulz", G.device.type)[1](G, coefficients, steps, eps, dtype)


def int6_matmul(x: Tensor, q: Tensor, scale: Tensor, *, in_features: int, packed: bool) -> Tensor:
    """y = x · (q ⊙ s)ᵀ from int6 weights. x: (..., K); q: (N, K) int8 or (N, 3·ceil(K/4)) uint8 packed;
    scale: (N,) fp16 → (..., N) in x's dtype. See :mod:`pgolf.kernels.int6_pack` for the layouts."""
    return implementation("int6_matmul", x.device.type)[1](x, q, scale, in_features=in_features, packed=packed)


softcap = reference.softcap


# --------------------------------------------------------------------------------------------------------
# Variants of an op that no Triton kernel implements: the model calls the reference for them through this hook.

REFERENCE_VARIANTS = {("attention", "xsa_diagonal"): "attention_xsa_diagonal"}
_FALLBACKS_NOTED: set[tuple[str, str, str]] = set()


def reference_fallback(op: str, variant: str, device_type: str) -> Callable:
    """The reference implementation of ``variant`` of ``op`` (see :data:`REFERENCE_VARIANTS`).

    When the dispatch would run Triton for ``op`` on this device it warns once per (op, variant, device) that
    this variant takes the reference path. Under ``torch.compile`` nothing is checked (no graph break); the model
    lists such layers in ``GPT.kernel_fallbacks()`` for the trainer's log."""
    import torch

    key = (op, variant, device_type)
    if not torch.compiler.is_compiling() and key not in _FALLBACKS_NOTED:
        _FALLBACKS_NOTED.add(key)
        if implementation(op, device_type)[0] == "triton":
            import warnings

            warnings.warn(f"pgolf.kernels: {op} variant {variant!r} has no Triton kernel; its layers run the "
                          f"PyTorch reference on {device_type}", stacklevel=2)
    return getattr(reference, REFERENCE_VARIANTS[(op, variant)])

sys.modules[__name__].__class__ = _KernelsPackage
