"""``pgolf-bench tune``: every kernel's launch config tuned at the record shapes on this GPU, into its tuned file.

Runs each op's launcher at the record shapes (:mod:`pgolf.bench.shapes`) on random CUDA tensors with tuning on
and the existing file ignored (``--keep`` tunes only the shape classes the file lacks), and writes the picks into
the GPU's tuned-config file (:mod:`pgolf.kernels.tuning`) after every call, so an interrupted run keeps what it
measured. Run it once per GPU type, outside any timed run; training and eval then launch those configs untuned.
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from pgolf.bench.shapes import Tensors, record_calls

OPS = ("mlp", "softcap_ce", "attention", "newton_schulz", "int6_matmul")


def run_tune(*, device: torch.device, ops: tuple[str, ...] = OPS, dtypes: tuple[str, ...] = ("bfloat16",),
             keep: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Tune and save; returns {'file': path, 'picks': {kernel: {key: config}}, 'seconds': wall time}."""
    if device.type != "cuda":
        raise RuntimeError("pgolf-bench tune times kernels on a CUDA GPU; none is available here "
                           "(pgolf-bench compile checks the configs without one)")
    os.environ["PGOLF_AUTOTUNE"] = "1"  # read at each pick
    from pgolf.kernels import launcher

    t0 = time.perf_counter()
    path: Path = launcher.save_tuned(device)
    with contextlib.nullcontext() if keep else launcher.retune():
        for op in ops:
            for dt in dtypes:
                for label, call in record_calls(op, getattr(torch, dt), Tensors(device)):
                    tc = time.perf_counter()
                    call()
                    torch.cuda.synchronize(device)
                    path = launcher.save_tuned(device)
                    log(f"[tune] {op} {dt} {label}: {time.perf_counter() - tc:.1f}s")
    picks = {k.qualname: dict(k.tuned) for k in launcher.KERNELS.values() if k.tuned}
    log(f"[tune] {sum(len(p) for p in picks.values())} shape classes tuned in {time.perf_counter() - t0:.0f}s; "
        f"written to {path}")
    return dict(file=str(path), picks=picks, seconds=round(time.perf_counter() - t0, 1))
