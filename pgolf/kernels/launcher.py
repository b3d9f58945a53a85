"""How every Triton kernel of :mod:`pgolf.kernels` is launched: one launch-config mechanism for all ops.

An op module declares each ``@triton.jit`` kernel once, with its configs, and launches it through that
declaration::

    UP_FWD = launcher.Kernel("mlp", "up_fwd", _mlp_gemm_kernel, candidates=[...], interpret=dict(BM=16, ...))
    UP_FWD.run(grid, args, consts, key=dict(m=..., n=..., dtype="bfloat16"), device=x.device)

A *config* is a dict of the kernel's tile constexprs plus ``num_warps`` and ``num_stages``; ``grid(meta)`` gets
the merged constexprs ``{**consts, **config}``; ``key`` names the shape class the config is chosen for.
:meth:`Kernel.pick` chooses, in this order:

1. under ``TRITON_INTERPRET=1`` (or for tensors off the GPU): ``interpret``, always (in compile-only mode the
   default, as on a GPU without a tuned file);
2. a config passed as ``run(config=...)`` (tests, and launchers whose kernels must share one config);
3. the choice already made in this process for the key;
4. the per-GPU tuned-config file (:mod:`pgolf.kernels.tuning`): section ``op``, entry ``"<kernel>|<key>"``;
5. when ``PGOLF_AUTOTUNE`` is on (the default): each of ``candidates`` timed with ``do_bench`` on the first call
   of the key (candidates that fail to compile or launch are skipped); the pick is written to the file at once
   with ``PGOLF_TUNED_WRITE=1``, else by :func:`save_tuned`;
6. ``default(key)``, by default the first candidate.

So a run whose GPU has a tuned file never tunes; without one, the first call of each shape class tunes, which the
trainer's and the benchmarks' untimed warm-ups absorb. ``pgolf-bench tune`` fills the file ahead of time.

Compile-only mode (``pgolf-bench compile``): inside :func:`compile_only` (no GPU needed), ``run`` hands every
launch to a hook instead of launching, and the hook compiles the configs of :meth:`Kernel.sweep` for a target GPU
through :meth:`Kernel.compile`. The op launchers run unchanged, with real shapes and strides, on CPU tensors.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from pgolf.kernels import tuning

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Kernels run under Triton's CPU interpreter (decided at import, as ``@triton.jit`` decides)."""
POISON = os.environ.get("PGOLF_KERNELS_POISON", "0") not in ("", "0")
"""Fill every buffer a launcher allocates with NaN (0xFF for integers), so an unwritten element shows (tests)."""

LAUNCH_OPTIONS = ("num_warps", "num_stages")
KERNELS: dict[str, "Kernel"] = {}  # "op.name" → declaration, filled as op modules are imported

Config = dict[str, Any]
Key = dict[str, Any]


@dataclass
class Kernel:
    """One ``@triton.jit`` kernel and every config it may launch with (see the module docstring)."""

    op: str                                  # file section and op module, e.g. 'mlp'
    name: str                                # kernel within the op, e.g. 'up_fwd'
    fn: Any                                  # the JITFunction
    candidates: list[Config] | Callable[[Key], list[Config]]  # what tuning times on a GPU (for a key)
    interpret: Config                        # the one config under the interpreter
    default: Callable[[Key], Config] | None = None  # the config when nothing was tuned (None: the first candidate)
    memory: dict[str, Config] = field(default_factory=dict)  # key string → config chosen in this process
    tuned: dict[str, Config] = field(default_factory=dict)   # key string → config tuning picked here

    def __post_init__(self) -> None:
        KERNELS[self.qualname] = self

    @property
    def qualname(self) -> str:
        return f"{self.op}.{self.name}"

    def run(self, grid: Callable[[Config], tuple], args: tuple, consts: Config | None = None, *, key: Key,
            device: torch.device, config: Config | None = None,
            bench_args: Callable[[], tuple] | None = None) -> None:
        """Launch with the picked config (or hand the launch to the compile hook in compile-only mode).

        ``bench_args()`` gives arguments that tuning may launch on repeatedly, for kernels whose real launch is
        not idempotent (e.g. an output that aliases an input)."""
        consts = consts or {}
        if _COMPILE_HOOK is not None:
            _COMPILE_HOOK(self, key, grid, args, consts, config)
            return

        made: list[tuple] = []  # bench_args() once, not inside the timing

        def bench(cfg: Config) -> None:
            if bench_args is not None and not made:
                made.append(bench_args())
            self.launch(cfg, grid, made[0] if made else args, consts)

        self.launch(config if config is not None else self.pick(key, device, bench), grid, args, consts)

    def launch(self, cfg: Config, grid: Callable[[Config], tuple], args: tuple, consts: Config) -> None:
        """One launch with ``cfg`` (no choice made)."""
        meta, options = split_config({**consts, **cfg})
        self.fn[grid(meta)](*args, **meta, **options)

    def compile(self, cfg: Config, grid: Callable[[Config], tuple], args: tuple, consts: Config):
        """Compile (no launch) for the active Triton target; returns Triton's compiled kernel."""
        meta, options = split_config({**consts, **cfg})
        return self.fn.warmup(*args, grid=grid(meta), **meta, **options)

    def pick(self, key: Key, device: torch.device, bench: Callable[[Config], None] | None = None) -> Config:
        """The config for ``key`` on ``device`` (order in the module docstring); ``bench(cfg)`` launches once."""
        if compiling():
            return self.default_for(key)
        if INTERPRET or device.type != "cuda":
            return self.interpret
        ks = key_string(key)
        cfg = self.memory.get(ks)
        if cfg is None and not _RETUNE:
            cfg = tuning.load(self.op, device).get(f"{self.name}|{ks}")
        if cfg is None and bench is not None and env_flag("PGOLF_AUTOTUNE", True):
            cfg = self._tune(self.candidates_for(key), bench)
            if cfg is not None:
                self.tuned[ks] = cfg
                if env_flag("PGOLF_TUNED_WRITE", False):
                    tuning.save(self.op, {f"{self.name}|{ks}": cfg}, device)
        cfg = dict(cfg) if cfg is not None else self.default_for(key)
        self.memory[ks] = cfg
        return cfg

    def candidates_for(self, key: Key) -> list[Config]:
        return self.candidates(key) if callable(self.candidates) else self.candidates

    def default_for(self, key: Key) -> Config:
        return dict(self.default(key) if self.default is not None else self.candidates_for(key)[0])

    def _tune(self, candidates: list[Config], bench: Callable[[Config], None]) -> Config | None:
        import triton.testing

        best, best_ms = None, math.inf
        for cfg in candidates:
            try:
                bench(cfg)  # compile outside the timing
                ms = triton.testing.do_bench(lambda: bench(cfg), warmup=5, rep=20, return_mode="median")
            except Exception:  # noqa: BLE001 - a config that cannot run on this GPU is skipped
                continue
            if ms < best_ms:
                best, best_ms = dict(cfg), ms
        return best

    def sweep(self, key: Key, *, everything: bool, pinned: Config | None = None) -> list[tuple[Config, list[str]]]:
        """Every config this kernel could launch with for ``key`` on a GPU, each with where it comes from:
        the default ('default'), or with ``everything`` also each candidate ('candidate N') and each tuned-file
        entry ('tuned <gpu> <key>'). A pinned config (``run(config=...)``) is the only one ('pinned')."""
        if pinned is not None:
            return [(dict(pinned), ["pinned"])]
        found: list[tuple[Config, list[str]]] = []

        def add(cfg: Config, source: str) -> None:
            for known, sources in found:
                if known == cfg:
                    sources.append(source)
                    return
            found.append((dict(cfg), [source]))

        add(self.default_for(key), "default")
        if everything:
            for i, cfg in enumerate(self.candidates_for(key)):
                add(cfg, f"candidate {i}")
            for gpu, data in tuning.files().items():
                for entry, cfg in (data.get("ops", {}).get(self.op) or {}).items():
                    if entry.startswith(f"{self.name}|"):
                        add(cfg, f"tuned {gpu} {entry.split('|', 1)[1]}")
        return found


# ---------------------------------------------------------------------------------------------------------
# Tuned picks, retuning and compile-only mode

_RETUNE = False
_COMPILE_HOOK: Callable[..., None] | None = None


def save_tuned(device: torch.device | int | str | None = None) -> Path:
    """Write every kernel's tuned picks of this process into its op's section of the per-GPU file; the path."""
    by_op: dict[str, dict[str, Config]] = {}
    for k in KERNELS.values():
        by_op.setdefault(k.op, {}).update({f"{k.name}|{ks}": cfg for ks, cfg in k.tuned.items()})
    path = tuning.path(device)
    for op, entries in by_op.items():
        if entries:
            path = tuning.save(op, entries, device)
    return path


@contextlib.contextmanager
def retune() -> Iterator[None]:
    """Tune every key met inside the block again, ignoring the tuned file and earlier choices."""
    global _RETUNE
    saved = {name: dict(k.memory) for name, k in KERNELS.items()}
    for k in KERNELS.values():
        k.memory.clear()
    _RETUNE = True
    try:
        yield
    finally:
        _RETUNE = False
        for name, k in KERNELS.items():
            k.memory.clear()
            k.memory.update(saved.get(name, {}))


@contextlib.contextmanager
def compile_only(hook: Callable[[Kernel, Key, Callable, tuple, Config, Config | None], None]) -> Iterator[None]:
    """Inside the block every ``Kernel.run`` calls ``hook(kernel, key, grid, args, consts, pinned)`` instead
    of launching; tensors may live on the CPU (see :func:`on_gpu`). Triton's active driver must already be a
    stand-in for the target (``pgolf.bench.compile`` does both)."""
    global _COMPILE_HOOK
    _COMPILE_HOOK = hook
    try:
        yield
    finally:
        _COMPILE_HOOK = None


def compiling() -> bool:
    """Whether launches are being compiled for a GPU instead of run (see :func:`compile_only`)."""
    return _COMPILE_HOOK is not None


# ---------------------------------------------------------------------------------------------------------
# What every op launcher needs

def on_gpu(t: Tensor) -> bool:
    """Whether ``t``'s kernels take the GPU path: on CUDA, or compiled for a GPU in compile-only mode."""
    return t.device.type == "cuda" or compiling()


def require_device(t: Tensor, what: str) -> None:
    """Raise unless ``t`` can be handed to a Triton kernel: CUDA, the interpreter, or compile-only mode."""
    if not (on_gpu(t) or INTERPRET):
        raise RuntimeError(f"the Triton {what} runs on CUDA, or on CPU only with TRITON_INTERPRET=1 set before "
                           f"pgolf.kernels is imported; got a tensor on {t.device}")


def upcast_dots(dtype: torch.dtype) -> bool:
    """bf16 ``tl.dot`` is wrong under the interpreter: kernels multiply in fp32 there when this is True."""
    return INTERPRET and dtype == torch.bfloat16


def new_output(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty``, or filled with NaN (0xFF for integers) when :data:`POISON` is on."""
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else 255
    return torch.full(shape, fill, dtype=dtype, device=device)


_SM_COUNT_STANDIN: int | None = None  # set by the compile sweep to the target's multiprocessor count


def sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (the compile target's nominal count in compile-only mode)."""
    if compiling() and _SM_COUNT_STANDIN is not None:
        return _SM_COUNT_STANDIN
    return torch.cuda.get_device_properties(device.index or 0).multi_processor_count


def by_dtype(half: list[Config], float32: list[Config]) -> Callable[[Key], list[Config]]:
    """Candidates per dtype (the key's 'dtype'): fp32 dots run on CUDA cores and need fewer registers per tile."""
    return lambda key: float32 if key["dtype"] == "float32" else half


def dtype_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16 (how keys and reports name dtypes)."""
    return str(dtype).removeprefix("torch.")


def key_string(key: Key) -> str:
    """'m=2048,n=512,dtype=bfloat16': a key as the tuned file stores it."""
    return ",".join(f"{k}={v}" for k, v in key.items())


def split_config(meta: Config) -> tuple[Config, Config]:
    """(constexprs, launch options) of a merged config."""
    return ({k: v for k, v in meta.items() if k not in LAUNCH_OPTIONS},
            {k: v for k, v in meta.items() if k in LAUNCH_OPTIONS})


def env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    return default if v is None else v.strip().lower() not in ("0", "false", "no", "off", "")


def declared(ops: tuple[str, ...] | None = None) -> dict[str, Kernel]:
    """Every declared kernel (importing the op modules), optionally only those of ``ops``."""
    import importlib

    from pgolf.kernels import TRITON_MODULES

    for module in sorted(set(TRITON_MODULES.values())):
        importlib.import_module(module)
    return {n: k for n, k in KERNELS.items() if ops is None or k.op in ops}
