"""Where a benchmark ran: commit, date, device kind, GPU name, versions; and the measured matmul peak.

The *device kind* (``nvidia-h200``, ``nvidia-h100-80gb-hbm3``, ``cpu``) is the GPU name as a lowercase slug, or
``cpu`` when no CUDA device is used. Regression checks only ever compare runs of the same device kind.

The commit comes from ``PGOLF_COMMIT`` when set (a copy of the tree without ``.git``, e.g. a GPU machine, can be
told its commit that way), else ``git rev-parse HEAD``, else ``.git/HEAD`` read directly, else ``unknown``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' → 'nvidia-h100-80gb-hbm3' (lowercase, runs of other characters → '-')."""
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s or "unknown"


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → cuda:0 when CUDA is available, else cpu; 'cpu' / 'cuda' / 'cuda:N' as given."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"--device {name} was asked for but torch sees no CUDA device")
    return dev


def gpu_name(device: torch.device | None = None) -> str | None:
    if device is not None and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_name(device if device is not None else 0)


def device_kind(device: torch.device | None = None) -> str:
    """The device kind runs are grouped by: the GPU name's slug, or 'cpu'."""
    name = gpu_name(device)
    return slug(name) if name else "cpu"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def commit_info() -> dict[str, Any]:
    """{'commit': 40-hex or 'unknown', 'commit_short': 7 chars, 'dirty': bool | None, 'commit_source': how}."""
    env = os.environ.get("PGOLF_COMMIT", "").strip()
    if env:
        return dict(commit=env, commit_short=env[:7], dirty=None, commit_source="PGOLF_COMMIT")
    sha = _git("rev-parse", "HEAD")
    if sha:
        status = _git("status", "--porcelain", "--untracked-files=no")
        return dict(commit=sha, commit_short=sha[:7], dirty=bool(status) if status is not None else None,
                    commit_source="git")
    sha = _read_git_head(REPO_ROOT / ".git")
    if sha:
        return dict(commit=sha, commit_short=sha[:7], dirty=None, commit_source=".git/HEAD")
    return dict(commit="unknown", commit_short="unknown", dirty=None, commit_source="none")


def _read_git_head(git_dir: Path) -> str | None:
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            f = git_dir / ref
            if f.exists():
                return f.read_text().strip()
            packed = git_dir / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 2 and parts[1] == ref:
                        return parts[0]
            return None
        return head if re.fullmatch(r"[0-9a-f]{40}", head) else None
    except OSError:
        return None


def resolve_rev(rev: str) -> str:
    """A git revision (branch, tag, short sha, HEAD~1) as a full sha when git knows it, else ``rev`` itself."""
    sha = _git("rev-parse", "--verify", "--quiet", rev + "^{commit}")
    return sha or rev


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def environment(device: torch.device) -> dict[str, Any]:
    """Everything a result needs to be compared fairly: commit, date, device kind, GPU, versions."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - triton is optional on some CPU builds
        triton_version = None
    info: dict[str, Any] = dict(date=utc_now(), **commit_info(), device=str(device), device_kind=device_kind(device),
                                gpu_name=gpu_name(device), torch=torch.__version__, triton=triton_version,
                                cuda=torch.version.cuda, python=platform.python_version(),
                                platform=platform.platform(), cpu_count=os.cpu_count(),
                                torch_threads=torch.get_num_threads(),
                                pgolf_kernels=os.environ.get("PGOLF_KERNELS", "auto"),
                                triton_interpret=os.environ.get("TRITON_INTERPRET") or None)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_memory_gib=round(props.total_memory / 2**30, 1), gpu_sms=props.multi_processor_count,
                    gpu_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    return info


def measure_matmul_peak(device: torch.device, *, smoke: bool = False) -> dict[str, Any]:
    """The device's measured dense matmul throughput, the denominator of MFU.

    CUDA: square bf16 ``torch.mm`` of n = 4096, 8192 and 16384 (fp32 accumulate, cuBLAS), each timed with
    ``do_bench`` (median); the best TFLOP/s is the peak. CPU: fp32 n = 256 and 512 (1024 without smoke) with
    ``perf_counter``. FLOPs of one product: 2·n³.
    """
    from pgolf.bench.core import time_stats

    if device.type == "cuda":
        dtype, sizes = torch.bfloat16, ([2048, 4096] if smoke else [4096, 8192, 16384])
    else:
        dtype, sizes = torch.float32, ([256, 512] if smoke else [256, 512, 1024])
    per_size = {}
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = time_stats(lambda: torch.mm(a, b), device, warmup=2, reps=5)["ms"]
        per_size[n] = 2 * n**3 / ms / 1e9
        del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    best = max(per_size, key=per_size.get)
    return dict(tflops=per_size[best], dtype=str(dtype).replace("torch.", ""), n=best,
                per_size={str(k): round(v, 2) for k, v in per_size.items()},
                method="do_bench median of torch.mm" if device.type == "cuda" else "perf_counter median of torch.mm")


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def reset_device(device: torch.device) -> None:
    """Between benchmark cases: drop compiled graphs and cached memory so one case cannot tilt the next."""
    try:
        import torch._dynamo

        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
