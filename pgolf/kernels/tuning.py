"""Tuned launch configs: one JSON file per GPU type, one section per op.

A tuned-config file holds the Triton launch configs (tile sizes, ``num_warps``, ``num_stages``) that
benchmarking picked on one GPU type, for every op module that tunes. It lives at
``pgolf/kernels/tuned/<gpu slug>.json`` (the folder can be moved with ``PGOLF_TUNED_DIR``), where the slug is
the CUDA device name lowercased with every run of other characters turned into ``_`` (``NVIDIA H200`` →
``nvidia_h200``). Layout::

    {"gpu": "NVIDIA H200", "triton": "3.6.0",
     "ops": {"newton_schulz": {"gram|p=512,q=512,b=32,dtype=bfloat16": {"BLOCK": 128, "BK": 64, "num_warps": 8,
                                                                         "num_stages": 3}},
             "mlp": {...}, "softcap_ce": {...}, "attention": {...}, "int6_matmul": {...}}}

A section per op, an entry ``"<kernel>|<key>"`` per tuned shape class (:mod:`pgolf.kernels.launch` chooses and
tunes the configs; this module only reads and writes the file). :func:`save` merges new entries into one op's
section and leaves every other section as it was (the file is re-read from disk first, and replaced atomically
under a lock), so ops and ranks can save into the same file in any order. On a GPU a kernel launches the config
its section has for the shape; only when the file has no entry does it tune, so **a run never tunes when the
file has an entry**. Under ``TRITON_INTERPRET=1`` the file is never read. Fill it once per GPU type, outside any
timed run, with ``pgolf-bench tune`` (or ``make gpu-check``, which tunes while it benchmarks).
"""

from __future__ import annotations

import functools
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
import triton

from pgolf.utils import atomic_write_json

ENV_DIR = "PGOLF_TUNED_DIR"
DEFAULT_DIR = Path(__file__).resolve().parent / "tuned"

_FILES: dict[tuple[str, str], dict] = {}  # ($PGOLF_TUNED_DIR, slug) → parsed file, as last read or written here


def gpu_slug(device: torch.device | int | None = None) -> str:
    """File stem of a CUDA device's tuned-config file, e.g. 'nvidia_h200' (the current device by default)."""
    return _slug(_index(device))


def _index(device: torch.device | int | None) -> int:
    if device is None or (isinstance(device, torch.device) and device.index is None):
        return torch.cuda.current_device()
    return device if isinstance(device, int) else device.index


@functools.lru_cache(maxsize=None)
def _slug(index: int) -> str:
    return re.sub(r"[^a-z0-9]+", "_", torch.cuda.get_device_name(index).lower()).strip("_")


def tuned_dir() -> Path:
    """``$PGOLF_TUNED_DIR`` if set, else ``pgolf/kernels/tuned``."""
    return Path(os.environ.get(ENV_DIR) or DEFAULT_DIR)


def path(gpu: str | torch.device | int | None = None) -> Path:
    """The tuned-config file of ``gpu``. Here and in :func:`load` / :func:`save` a GPU is named by its slug
    (``'nvidia_h200'``), a CUDA device (or its index), or None for the current device."""
    return tuned_dir() / f"{_slug_of(gpu)}.json"


def _slug_of(gpu: str | torch.device | int | None) -> str:
    return gpu if isinstance(gpu, str) else gpu_slug(gpu)


def _read(p: Path) -> dict:
    if not p.is_file():
        return {}
    try:
        data = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring unreadable tuned-config file {p}: {e}")
        return {}
    return data if isinstance(data, dict) else {}


def load(op: str, gpu: str | torch.device | int | None = None) -> dict:
    """``op``'s section of the tuned-config file ({key: config}); {} when the file or the section is absent.

    The file is read once per process (and again after :func:`save` or :func:`clear_cache`); the returned dict
    is shared, so copy an entry before changing it. Cheap enough to call on every launch."""
    slug = _slug_of(gpu)
    key = (os.environ.get(ENV_DIR) or "", slug)
    data = _FILES.get(key)
    if data is None:
        data = _FILES[key] = _read(path(slug))
    return data.get("ops", {}).get(op) or {}


def save(op: str, entries: dict, gpu: str | torch.device | int | None = None) -> Path:
    """Merge ``entries`` ({key: config}) into ``op``'s section of the tuned-config file; returns its path.

    Reads the file from disk (not the cached copy), updates only ``op``'s section, and writes it atomically,
    holding a lock on the folder so concurrent savers (other ops, other ranks) do not drop each other's
    entries. An unreadable file is replaced."""
    slug = _slug_of(gpu)
    p = path(slug)
    with _locked(p.parent):
        old = _read(p)
        ops = old.get("ops") if isinstance(old.get("ops"), dict) else {}
        ops[op] = {**ops.get(op, {}), **entries}
        name = old.get("gpu") if isinstance(gpu, str) else torch.cuda.get_device_name(_index(gpu))
        data = {**({"gpu": name} if name else {}), "triton": triton.__version__, "ops": ops}
        atomic_write_json(p, data)
    _FILES[(os.environ.get(ENV_DIR) or "", slug)] = data
    return p


def files() -> dict[str, dict]:
    """Every tuned-config file of the folder, parsed: {gpu slug: file}."""
    folder = tuned_dir()
    return {p.stem: _read(p) for p in sorted(folder.glob("*.json"))} if folder.is_dir() else {}


def clear_cache() -> None:
    """Forget the files read so far (the next :func:`load` reads from disk)."""
    _FILES.clear()


def pow2_bucket(n: int, lo: int = 1, hi: int | None = None) -> int:
    """``n`` rounded up to a power of two, clamped to [lo, hi] (tuning keys must not change with every size)."""
    b = max(lo, 1 << max(0, int(n) - 1).bit_length())
    return b if hi is None else min(hi, b)


@contextmanager
def _locked(folder: Path) -> Iterator[None]:
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace only
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
