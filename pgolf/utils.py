"""Outputs that never clobber and never appear half-written.

- :func:`atomic_write_bytes` (and ``_text``, ``_json``, :func:`atomic_torch_save`, :func:`atomic_copy`): a temp file
  in the target's folder, fsync, then one rename, so a crash or a full disk leaves the old file or nothing.
- :func:`refuse_existing`: an :class:`~pgolf.errors.OutputExistsError` naming the path and ``--force`` when an
  output is already there; every command checks its outputs with it before any work.
- :func:`staged_dir`: a whole output folder built in a temp folder beside the target and renamed into place at the
  end (with ``force``, replacing the old one only then); a failure leaves the target as it was.
- :func:`check_writable`: a :class:`~pgolf.errors.ConfigError` naming the flag when a folder cannot be created or
  written, found before any work starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from pgolf.errors import ConfigError, OutputExistsError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: a temp file in the same folder, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        _unlink(tmp)
        if e.filename is None and e.errno is not None:  # a failed write() names no file: name the output
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    except BaseException:
        _unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomic UTF-8 text write (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Atomic JSON write, pretty-printed with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through a memory buffer and an atomic rename."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy ``src`` to ``dst`` through a temp file beside ``dst`` and a rename."""
    dst = Path(dst)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dst)
    except BaseException:
        _unlink(tmp)
        raise
    return dst


def refuse_existing(path: str | os.PathLike, *, force: bool, what: str, flag: str = "--out") -> bool:
    """Raise OutputExistsError when ``path`` exists (a file, or a folder with anything in it) unless ``force``.

    Returns whether something is there (so a forced caller knows it replaces it). ``what`` names the output in the
    message, ``flag`` the option that chose the path.
    """
    p = Path(path)
    there = p.is_file() or p.is_symlink() or (p.is_dir() and any(p.iterdir()))
    if there and not force:
        kind = "folder" if p.is_dir() else "file"
        raise OutputExistsError(f"{flag} {p}: the {what} already exists (a {kind}); nothing was changed. Choose "
                                f"another path, or pass --force to replace it")
    return there


def check_output(path: str | os.PathLike, *, force: bool, what: str, flag: str = "--out") -> bool:
    """Before any work: ``path`` may be written (its folder is writable or can be made) and replaces nothing
    unless ``force`` (:func:`refuse_existing`, :func:`check_writable`). Returns whether something is there."""
    there = refuse_existing(path, force=force, what=what, flag=flag)
    check_writable(Path(path).parent, flag)
    return there


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, *, force: bool, what: str = "output folder",
               flag: str = "--out") -> Iterator[Path]:
    """Yield an empty temp folder beside ``target``; when the block ends without error it becomes ``target``.

    An existing ``target`` is refused (:func:`refuse_existing`) unless ``force``; when forced it is replaced only
    after the new folder is complete. On an error (or Ctrl-C) the temp folder is removed and ``target`` is
    untouched.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{flag} {target} is a file, not a folder; choose a folder path")
    refuse_existing(target, force=force, what=what, flag=flag)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        _swap_in(tmp, target)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.filename is None and e.errno is not None:  # a failed write() names no file: name the output
            raise OSError(e.errno, e.strerror, str(target)) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_writable(path: str | os.PathLike, flag: str) -> None:
    """ConfigError naming ``flag`` unless the folder ``path`` exists writable or can be created (probed, not
    guessed: a temp file is created and removed in the nearest existing folder)."""
    p = Path(path).absolute()
    base = p
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise ConfigError(f"{flag} {path}: {base} is a file, so the folder cannot be created there")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write in {base} ({e.strerror}); choose a folder you can "
                          f"write to") from None


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``; an existing ``target`` is moved aside first and deleted after."""
    if not target.exists():
        os.rename(tmp, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.rename(target, old / target.name)
    os.rename(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def _unlink(path: str | os.PathLike) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_fields(cls: type, d: dict[str, Any], what: str) -> None:
    """ValueError naming the keys of ``d`` that are not fields of the dataclass ``cls`` (and the known ones)."""
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise ValueError(f"unknown {what} {bad}; known: {sorted(known)}")


@contextlib.contextmanager
def distributed_session() -> Iterator[None]:
    """Close this process's torch.distributed group on the way out of the block, however it is left.

    After a block that completed, every rank meets at a barrier first: a rank that tears its sockets down while
    a peer is still finishing makes gloo abort that peer (SIGABRT, "terminate called without an active
    exception"). After an error there is no barrier (the peers may never arrive); the group is just destroyed.
    """
    import torch.distributed as dist

    completed = False
    try:
        yield
        completed = True
    finally:
        if dist.is_available() and dist.is_initialized():
            if completed:
                dist.barrier()
            dist.destroy_process_group()
