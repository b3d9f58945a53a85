"""Kernel benchmark cases: one module ``<op>.py`` per op, each defining ``cases(smoke, device)`` (discovered by
:mod:`pgolf.bench.kernels`), and the helpers they share to get the implementations under test."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch


def triton_module(name: str, device: torch.device | str) -> ModuleType | None:
    """``pgolf.kernels.<name>`` (e.g. ``'mlp'``, ``'xsa_attention'``) when Triton kernels can run on ``device``
    and the module imports, else None.

    Triton runs on CUDA, or on CPU under the interpreter (``TRITON_INTERPRET=1``, set before the module is first
    imported). Imported by name: ``pgolf.kernels.mlp`` as an attribute is the dispatch function, not the module.
    """
    if torch.device(device).type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        return importlib.import_module(f"pgolf.kernels.{name}")
    except ImportError:
        return None


def standard_impls(op_module: str, attr: str, reference_fn, device):
    """{'triton': the op module's ``attr`` (when usable on ``device``), 'eager': ``reference_fn``, and on CUDA
    'compiled': ``torch.compile(reference_fn)``}: the implementations most op benchmarks compare."""
    mod = triton_module(op_module, device)
    impls = {"triton": getattr(mod, attr)} if mod is not None else {}
    impls["eager"] = reference_fn
    if device.type == "cuda":
        impls["compiled"] = torch.compile(reference_fn, dynamic=False)
    return impls
