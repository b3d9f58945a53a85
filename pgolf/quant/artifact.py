"""The artifact: a versioned, checksummed, code-free container of the quantized model.

Byte layout (all integers little-endian)::

    offset  size  field
    0       8     magic b"PGOLFART"
    8       2     format version (uint16, currently 1)
    10      2     flags (uint16, 0)
    12      4     H = length of the compressed header (uint32)
    16      8     P = length of the payload (uint64)
    24      32    SHA-256 of the H + P bytes that follow
    56      H     brotli-compressed UTF-8 JSON header
    56+H    P     payload: the compressed streams back to back, in the header's order

The header holds the model config, the fingerprint of the tokenizer the model was trained with (``tokenizer``:
SHA-256 of its model file and its vocab size; :func:`check_tokenizer` refuses scoring with another one), the
layout, per-tensor entries (name, shape, dtype, scheme, group, stream, bits,
k, method, LQER rank) and the streams (name, compressed and raw length). Each stream is one brotli-11 block
(window 2^24) holding the values of the tensors assigned to it (R6-style per-role groups: ``tok_emb``,
``attn.c_q``, ..., ``mlp.proj``, ``gate``, ``other``, ``lqer``, ``fp16``), in header order: first every integer
part (layout ``int8``, the default: one byte per value, each matrix stored transposed, i.e. column-major; layout
``packed6``: int6 tensors packed 4 values in 3 bytes per row by :mod:`pgolf.kernels.int6_pack`, the Int6Linear
layout, other widths as int8; LQER factors row-major int8), then every fp16 part (per-row scales, LQER scales,
passthrough tensors) with the byte planes split (all low bytes, then all high bytes: the records' stride-2 byte shuffle, on the fp16 region only).

Loading checks, in order: magic, version (newer → error), length (truncated / trailing bytes), checksum, then the
header's consistency. Nothing in the file is executed: the header is JSON, tensors are built from raw bytes with
an allow-listed dtype. Writing is atomic (:func:`pgolf.utils.atomic_write_bytes`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

from pgolf.errors import ConfigError, InputError, MismatchError, MissingInputError

MAGIC = b"PGOLFART"
FORMAT_VERSION = 1
PREFIX = struct.Struct("<8sHHIQ32s")
PREFIX_BYTES = PREFIX.size  # 56
LAYOUTS = ("int8", "packed6")
BROTLI_QUALITY = 11
BROTLI_LGWIN = 24
_RAW_DTYPES = {"int8": np.int8, "uint8": np.uint8, "float16": np.float16}
_FP_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
              "float64": torch.float64}


class ArtifactError(InputError):
    """The file is not a usable pgolf artifact; the message names the problem."""


class NotAnArtifactError(ArtifactError):
    pass


class ArtifactVersionError(ArtifactError):
    pass


class TruncatedArtifactError(ArtifactError):
    pass


class CorruptedArtifactError(ArtifactError):
    pass


@dataclass
class QTensor:
    """One tensor of the quantized model.

    scheme 'int': ``q`` int8 (N, K) values within ±(2^(bits−1)−1) and ``scale`` fp16 (N,); dequantized
    ``q·s`` (+ LQER ``Â B̂``) in fp32, then cast to ``dtype``. scheme 'fp16': ``data`` holds the fp16 tensor.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    scheme: str
    group: str
    stream: str
    bits: int | None = None
    k: float | None = None
    method: str = "fp16"
    q: Tensor | None = None
    scale: Tensor | None = None
    data: Tensor | None = None
    lqer: dict[str, Any] | None = None
    q_packed: Tensor | None = None  # the packed int6 bytes as read from a 'packed6' artifact (for Int6Linear)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class QuantizedModel:
    config: dict[str, Any]
    tensors: list[QTensor]
    layout: str = "int8"
    meta: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None  # the training tokenizer's fingerprint (Tokenizer.fingerprint())

    def __getitem__(self, name: str) -> QTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)


# ---- encoding ---------------------------------------------------------------------------------------------------

def _packed(qt: QTensor, layout: str) -> bool:
    return layout == "packed6" and qt.scheme == "int" and qt.bits is not None and qt.bits <= 6


def _int_parts(qt: QTensor, layout: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(part, raw dtype, stored shape) of the integer parts of ``qt`` in its own stream.

    int8 values are stored column-major (the transposed matrix, (K, N)): measured smaller after brotli.
    """
    if qt.scheme != "int":
        return []
    N, K = qt.shape
    if _packed(qt, layout):
        return [("q", "uint8", (N, 3 * ((K + 3) // 4)))]
    return [("q", "int8", (K, N))]


def _fp16_parts(qt: QTensor) -> list[tuple[str, str, tuple[int, ...]]]:
    if qt.scheme == "int":
        return [("scale", "float16", (qt.shape[0],))]
    return [("data", "float16", tuple(qt.shape))]


def _lqer_parts(qt: QTensor) -> tuple[list, list]:
    """(int parts, fp16 parts) of ``qt``'s LQER factors in the 'lqer' stream."""
    r = qt.lqer["rank"]
    N, K = qt.shape
    nb = r if qt.lqer["b_mode"] == "row" else r * K // int(qt.lqer["b_mode"][len("group"):])
    return ([("a_q", "int8", (N, r)), ("b_q", "int8", (r, K))],
            [("a_scale", "float16", (1,)), ("b_scale", "float16", (nb,))])


def _stream_plan(tensors: list[QTensor], layout: str) -> dict[str, tuple[list, list]]:
    """stream name → ([(tensor, part, dtype, shape) integer parts], [... fp16 parts]) in header order."""
    plan: dict[str, tuple[list, list]] = {}
    for qt in tensors:
        ints, fps = plan.setdefault(qt.stream, ([], []))
        ints += [(qt, *p) for p in _int_parts(qt, layout)]
        fps += [(qt, *p) for p in _fp16_parts(qt)]
        if qt.lqer is not None:
            li, lf = _lqer_parts(qt)
            ints2, fps2 = plan.setdefault("lqer", ([], []))
            ints2 += [(qt, *p) for p in li]
            fps2 += [(qt, *p) for p in lf]
    if "lqer" in plan:  # the LQER stream goes last
        plan["lqer"] = plan.pop("lqer")
    return plan


def _part_tensor(qt: QTensor, part: str, layout: str) -> Tensor:
    if part == "q":
        if _packed(qt, layout):
            from pgolf.kernels.int6_pack import pack_int6

            return pack_int6(qt.q)
        return qt.q.t()
    if part in ("scale", "data"):
        return getattr(qt, part)
    return qt.lqer[part]


def _split_planes(raw: bytes) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(-1, 2).T.tobytes()


def _join_planes(raw: bytes) -> bytes:
    a = np.frombuffer(raw, dtype=np.uint8)
    return a.reshape(2, -1).T.tobytes()


def _nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * np.dtype(_RAW_DTYPES[dtype]).itemsize


def _tensor_entry(qt: QTensor) -> dict[str, Any]:
    e: dict[str, Any] = {"name": qt.name, "shape": list(qt.shape), "dtype": qt.dtype, "scheme": qt.scheme,
                         "group": qt.group, "stream": qt.stream, "method": qt.method}
    if qt.scheme == "int":
        e["bits"] = qt.bits
        if qt.k is not None:
            e["k"] = qt.k
    if qt.lqer is not None:
        e["lqer"] = {"rank": qt.lqer["rank"], "b_mode": qt.lqer["b_mode"]}
    return e


def _check_tensor(qt: QTensor) -> None:
    if qt.scheme == "int":
        if qt.q is None or qt.scale is None or len(qt.shape) != 2:
            raise ValueError(f"{qt.name}: an int tensor needs 2-D q and scale")
        Q = 2 ** (qt.bits - 1) - 1
        if qt.q.dtype != torch.int8 or tuple(qt.q.shape) != tuple(qt.shape):
            raise ValueError(f"{qt.name}: q must be int8 of shape {qt.shape}, got {qt.q.dtype} {tuple(qt.q.shape)}")
        if qt.q.numel() and (int(qt.q.min()) < -Q or int(qt.q.max()) > Q):
            raise ValueError(f"{qt.name}: values outside ±{Q} for {qt.bits} bits")
        if qt.scale.dtype != torch.float16 or tuple(qt.scale.shape) != (qt.shape[0],):
            raise ValueError(f"{qt.name}: scale must be fp16 of shape ({qt.shape[0]},)")
    elif qt.scheme == "fp16":
        if qt.data is None or qt.data.dtype != torch.float16 or tuple(qt.data.shape) != tuple(qt.shape):
            raise ValueError(f"{qt.name}: fp16 passthrough data must be fp16 of shape {qt.shape}")
    else:
        raise ValueError(f"{qt.name}: unknown scheme {qt.scheme!r}")


def encode(qm: QuantizedModel, *, layout: str | None = None, quality: int = BROTLI_QUALITY) -> bytes:
    """The artifact bytes of ``qm`` (see the module docstring); ``layout`` overrides ``qm.layout``."""
    import brotli

    layout = layout or qm.layout
    if layout not in LAYOUTS:
        raise ValueError(f"artifact layout must be one of {LAYOUTS}, got {layout!r}")
    names = [qt.name for qt in qm.tensors]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in the quantized model")
    for qt in qm.tensors:
        _check_tensor(qt)
    raws: dict[str, bytes] = {}
    for sname, (ints, fps) in _stream_plan(qm.tensors, layout).items():
        int_raw = b"".join(_part_tensor(qt, part, layout).detach().cpu().contiguous().numpy().tobytes()
                           for qt, part, _, _ in ints)
        fp_raw = b"".join(_part_tensor(qt, part, layout).detach().cpu().to(torch.float16).contiguous().numpy()
                          .tobytes() for qt, part, _, _ in fps)
        raws[sname] = int_raw + _split_planes(fp_raw)
    # the streams are independent: compress them in parallel (brotli releases the GIL); the bytes do not depend on it
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, min(len(raws), os.cpu_count() or 1))) as ex:
        payload = list(ex.map(lambda raw: brotli.compress(raw, quality=quality, lgwin=BROTLI_LGWIN), raws.values()))
    streams = [{"name": n, "bytes": len(c), "raw": len(r)} for (n, r), c in zip(raws.items(), payload)]
    header = {"format": "pgolf-artifact", "version": FORMAT_VERSION, "model": qm.config,
              "layout": {"values": layout, "order": "row" if layout == "packed6" else "col", "fp16": "planes",
                         "codec": "brotli"}, "meta": qm.meta,
              "tensors": [_tensor_entry(qt) for qt in qm.tensors], "streams": streams}
    if qm.tokenizer is not None:
        header["tokenizer"] = dict(qm.tokenizer)
    header_c = brotli.compress(json.dumps(header, separators=(",", ":"), sort_keys=True).encode("utf-8"),
                               quality=quality)
    body = header_c + b"".join(payload)
    digest = hashlib.sha256(body).digest()
    return PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header_c), len(body) - len(header_c), digest) + body


# ---- decoding ---------------------------------------------------------------------------------------------------

def read_header(blob: bytes, *, source: str = "artifact") -> tuple[dict[str, Any], int]:
    """(header dict, offset of the payload) after checking magic, version, length and checksum."""
    import brotli

    if len(blob) < len(MAGIC) or blob[: len(MAGIC)] != MAGIC:
        if len(blob) < len(MAGIC) and MAGIC.startswith(blob):
            raise TruncatedArtifactError(f"{source}: truncated: {len(blob)} bytes, shorter than the 8-byte magic")
        raise NotAnArtifactError(f"{source}: not a pgolf artifact: wrong magic {bytes(blob[:8])!r} "
                                 f"(expected {MAGIC!r})")
    if len(blob) < PREFIX_BYTES:
        raise TruncatedArtifactError(f"{source}: truncated: {len(blob)} bytes, shorter than the "
                                     f"{PREFIX_BYTES}-byte fixed header")
    _, version, flags, hlen, plen, digest = PREFIX.unpack_from(blob)
    if version > FORMAT_VERSION:
        raise ArtifactVersionError(f"{source}: artifact format version {version} is newer than this pgolf "
                                   f"supports ({FORMAT_VERSION}); upgrade pgolf to read it")
    if version < 1:
        raise CorruptedArtifactError(f"{source}: invalid format version {version}")
    expected = PREFIX_BYTES + hlen + plen
    if len(blob) < expected:
        raise TruncatedArtifactError(f"{source}: truncated: the header announces {expected:,} bytes but the file "
                                     f"has {len(blob):,} ({expected - len(blob):,} missing)")
    if len(blob) > expected:
        raise CorruptedArtifactError(f"{source}: {len(blob) - expected:,} unexpected trailing bytes after the "
                                     f"announced {expected:,}")
    body = memoryview(blob)[PREFIX_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise CorruptedArtifactError(f"{source}: checksum mismatch: the SHA-256 of the contents does not match "
                                     f"the stored one (the file is corrupted)")
    if flags != 0:
        raise CorruptedArtifactError(f"{source}: unknown flags {flags:#x}")
    try:
        header = json.loads(brotli.decompress(bytes(body[:hlen])).decode("utf-8"))
    except (brotli.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CorruptedArtifactError(f"{source}: unreadable header ({e})") from None
    if not isinstance(header, dict) or header.get("format") != "pgolf-artifact":
        raise CorruptedArtifactError(f"{source}: the header is not a pgolf artifact header")
    return header, PREFIX_BYTES + hlen


def decode(blob: bytes, *, source: str = "artifact") -> QuantizedModel:
    """The :class:`QuantizedModel` stored in ``blob`` (raises an :class:`ArtifactError` naming the problem)."""
    import brotli

    header, offset = read_header(blob, source=source)
    try:
        layout = header["layout"]["values"]
        if layout not in LAYOUTS:
            raise CorruptedArtifactError(f"{source}: unknown value layout {layout!r}")
        tensors = [_entry_tensor(e) for e in header["tensors"]]
        plan = _stream_plan(tensors, layout)
        declared = [s["name"] for s in header["streams"]]
        if declared != list(plan):
            raise CorruptedArtifactError(f"{source}: the header's streams {declared} do not match its tensors "
                                         f"{list(plan)}")
        for s in header["streams"]:
            comp = blob[offset: offset + int(s["bytes"])]
            offset += int(s["bytes"])
            raw = brotli.decompress(comp)
            ints, fps = plan[s["name"]]
            n_int = sum(_nbytes(dt, sh) for _, _, dt, sh in ints)
            n_fp = sum(_nbytes(dt, sh) for _, _, dt, sh in fps)
            if len(raw) != n_int + n_fp or len(raw) != int(s["raw"]):
                raise CorruptedArtifactError(f"{source}: stream {s['name']!r} holds {len(raw)} bytes, the header "
                                             f"describes {n_int + n_fp}")
            pos = 0
            for qt, part, dt, sh in ints:
                n = _nbytes(dt, sh)
                _set_part(qt, part, _from_bytes(raw[pos: pos + n], dt, sh), layout)
                pos += n
            fp = _join_planes(raw[pos:])
            pos = 0
            for qt, part, dt, sh in fps:
                n = _nbytes(dt, sh)
                _set_part(qt, part, _from_bytes(fp[pos: pos + n], dt, sh), layout)
                pos += n
        if offset != len(blob):
            raise CorruptedArtifactError(f"{source}: the streams do not cover the payload")
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, brotli.error) as e:
        raise CorruptedArtifactError(f"{source}: inconsistent header or payload ({type(e).__name__}: {e})") from None
    for qt in tensors:
        _check_tensor(qt)
    return QuantizedModel(header["model"], tensors, layout=layout, meta=header.get("meta", {}),
                          tokenizer=header.get("tokenizer"))


def _entry_tensor(e: Mapping[str, Any]) -> QTensor:
    shape = tuple(int(x) for x in e["shape"])
    if any(x < 0 for x in shape) or e["dtype"] not in _FP_DTYPES or e["scheme"] not in ("int", "fp16"):
        raise CorruptedArtifactError(f"bad tensor entry {e.get('name')!r}")
    qt = QTensor(str(e["name"]), shape, e["dtype"], e["scheme"], str(e["group"]), str(e["stream"]),
                 bits=int(e["bits"]) if e.get("bits") is not None else None,
                 k=float(e["k"]) if e.get("k") is not None else None, method=str(e.get("method", "fp16")))
    if qt.scheme == "int" and (len(shape) != 2 or qt.bits is None or not 2 <= qt.bits <= 8):
        raise CorruptedArtifactError(f"bad int tensor entry {qt.name!r}")
    if e.get("lqer"):
        mode = str(e["lqer"]["b_mode"])
        if mode != "row" and not (mode.startswith("group") and mode[5:].isdigit() and int(mode[5:]) > 0):
            raise CorruptedArtifactError(f"bad LQER mode {mode!r} for {qt.name!r}")
        qt.lqer = {"rank": int(e["lqer"]["rank"]), "b_mode": mode}
    return qt


def _from_bytes(raw: bytes, dtype: str, shape: tuple[int, ...]) -> Tensor:
    arr = np.frombuffer(raw, dtype=_RAW_DTYPES[dtype]).reshape(shape).copy()
    return torch.from_numpy(arr)


def _set_part(qt: QTensor, part: str, t: Tensor, layout: str) -> None:
    if part == "q":
        if _packed(qt, layout):
            from pgolf.kernels.int6_pack import unpack_int6

            qt.q_packed = t
            t = unpack_int6(t, qt.shape[1])
        else:
            t = t.t().contiguous()
        qt.q = t
    elif part in ("scale", "data"):
        setattr(qt, part, t)
    else:
        qt.lqer[part] = t


# ---- files, dequantization and the rebuilt model ----------------------------------------------------------------

def save_artifact(path: str | os.PathLike, qm: QuantizedModel, *, layout: str | None = None) -> int:
    """Write ``qm`` to ``path`` atomically; returns the file size in bytes."""
    from pgolf.utils import atomic_write_bytes

    blob = encode(qm, layout=layout)
    atomic_write_bytes(path, blob)
    return len(blob)


def load_artifact(path: str | os.PathLike) -> QuantizedModel:
    """Read and check an artifact file (see :func:`decode`)."""
    return decode(read_artifact_bytes(path), source=str(path))


def read_artifact_bytes(path: str | os.PathLike) -> bytes:
    """The file's bytes; a missing path or a folder is a named error, not an OSError."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"artifact {p} is a folder; pass the artifact file inside it (e.g. {p / 'final_model.pgq'})")
    if not p.is_file():
        raise MissingInputError(f"artifact {p} does not exist; pass the .pgq file a run or python -m pgolf.quant "
                                f"wrote")
    return p.read_bytes()


def check_tokenizer(qm: QuantizedModel, tokenizer, *, source: str) -> str | None:
    """Refuse (MismatchError) a tokenizer other than the one ``qm`` was trained with; returns a warning when the
    artifact predates fingerprints and cannot be checked, else None. ``tokenizer``: a :class:`Tokenizer`."""
    tokenizer.check_vocab(int(qm.config["vocab_size"]))
    if qm.tokenizer is None:
        return (f"{source} records no tokenizer fingerprint (written before pgolf recorded one): cannot check that "
                f"{tokenizer.path} is the tokenizer it was trained with")
    tokenizer.check_fingerprint(qm.tokenizer, source=source)
    return None


def check_model_config(qm: QuantizedModel, expected: Mapping[str, Any], *, source: str, against: str) -> None:
    """MismatchError unless the artifact's model config equals ``expected`` (e.g. a run summary's)."""
    if dict(qm.config) != dict(expected):
        diff = sorted(k for k in set(qm.config) | set(expected) if qm.config.get(k) != expected.get(k))
        raise MismatchError(f"{source} holds a model config that differs from {against} in {', '.join(diff[:6])}; "
                            f"it is not this run's artifact")


def dequantize_tensor(qt: QTensor) -> Tensor:
    """The tensor's weights in its original dtype: fp32 ``q·s`` (+ ``Â B̂``), then cast."""
    dtype = _FP_DTYPES[qt.dtype]
    if qt.scheme == "fp16":
        return qt.data.to(dtype)
    w = qt.q.float() * qt.scale.float().view(-1, 1)
    if qt.lqer is not None:
        from pgolf.quant.lqer import lqer_delta

        w = w + lqer_delta(qt.lqer)
    return w.to(dtype)


def dequantize_state(qm: QuantizedModel) -> dict[str, Tensor]:
    """{name: dequantized tensor} in the model's order."""
    return {qt.name: dequantize_tensor(qt) for qt in qm.tensors}


def build_model(source: QuantizedModel | str | os.PathLike, *, device: str | torch.device = "cpu",
                int6_matmul: bool = False):
    """A :class:`pgolf.model.gpt.GPT` rebuilt from an artifact (file path or decoded) alone, in eval mode.

    ``int6_matmul`` swaps every Linear whose weight is stored int6 without an LQER correction for
    ``pgolf.kernels.int6_matmul.Int6Linear`` (the int6 kernel through the dispatch).
    """
    from pgolf.model.config import GPTConfig
    from pgolf.model.gpt import GPT

    qm = source if isinstance(source, QuantizedModel) else load_artifact(source)
    cfg = GPTConfig.from_dict(qm.config)
    with torch.device("meta"):
        model = GPT(cfg)
    model = model.to_empty(device=device)
    state = dequantize_state(qm)
    missing = set(model.state_dict()) ^ set(state)
    if missing:
        raise ArtifactError(f"the artifact's tensors do not match the model config: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=True)
    if cfg.has_recurrence:
        model.looping_active = True
    fake_quant = qm.meta.get("fake_quant_in_eval")
    if fake_quant:  # the run kept late QAT on in eval (#1499's code): so does its rebuilt model
        model.set_fake_quant(fake_quant["targets"], floor=fake_quant["floor"], in_eval=True)
    if int6_matmul:
        swap_int6_linears(model, qm, device=device)
    return model.eval()


def swap_int6_linears(model: torch.nn.Module, qm: QuantizedModel, *, device: str | torch.device = "cpu") -> int:
    """Replace the int6 Linear layers of ``model`` by Int6Linear; returns how many were swapped."""
    try:
        from pgolf.kernels.int6_matmul import Int6Linear
    except ModuleNotFoundError as e:
        if e.name not in ("pgolf.kernels.int6_matmul", "triton"):
            raise
        raise ConfigError("--int6-matmul needs pgolf.kernels.int6_matmul (class Int6Linear), which is not "
                           f"available here ({e.name} is missing); evaluate without --int6-matmul") from None
    n = 0
    for qt in qm.tensors:
        if qt.scheme != "int" or qt.bits != 6 or qt.lqer is not None or not qt.name.endswith(".weight"):
            continue
        parent_name, _, child = qt.name[: -len(".weight")].rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        lin = getattr(parent, child, None)
        if not isinstance(lin, torch.nn.Linear):
            continue
        packed = qt.q_packed
        q = packed if packed is not None else qt.q
        new = Int6Linear(q.to(device), qt.scale.to(device), qt.shape[1], packed is not None)
        setattr(parent, child, new)
        n += 1
    return n


__all__ = ["MAGIC", "FORMAT_VERSION", "PREFIX_BYTES", "LAYOUTS", "ArtifactError", "NotAnArtifactError",
           "ArtifactVersionError", "TruncatedArtifactError", "CorruptedArtifactError", "QTensor", "QuantizedModel",
           "encode", "decode", "read_header", "save_artifact", "load_artifact", "read_artifact_bytes",
           "check_tokenizer", "check_model_config", "dequantize_tensor", "dequantize_state", "build_model",
           "swap_int6_linears"]
