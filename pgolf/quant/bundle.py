"""The self-contained ``train_gpt.py`` of one run configuration, and its counted size (``bytes_code``).

Every byte of code is a byte less for the model, so the program holds only what the packed configuration can
reach, minified, and is compressed like the records' wrappers:

1. **Specialize** (:mod:`pgolf.quant.specialize`): the sources of the static import closure of
   :mod:`pgolf.quant.runner` are parsed and every test on a setting the run fixed is decided (``if cfg.eval_stride``,
   ``loader == "packed"``, ``smear_gate == "bos"``, parameters no call overrides or every call passes as one
   constant), presets other than the run's dropped. Each decided setting test becomes a *pin* that the packed
   program checks.
2. **Reach** (:mod:`pgolf.quant.reach`): from ``runner.main`` only the definitions kept code can use survive: the
   Triton module of each op the model reaches (none when the run's ``device`` is ``cpu``), the functions, classes,
   methods and constants named on the way; docstrings, comments, unread annotations and spaces go.
3. **Program**: the kept modules as one raw string (``T``, a ``#@module`` line before each), the pins (``P``), the
   tuned-config files (``D``) and a loader that serves the modules to ``import`` under their real names
   (``sys.meta_path``, sources registered in :mod:`linecache` for ``triton.jit``) and defines ``main``: it reads the
   configuration as the runner does (preset < the run's overrides < environment variables), refuses a variable that
   breaks a pin (naming it: the program has no code for that setting), then trains, quantizes and evaluates.
4. **Wrapper**: the program compressed with brotli-11 (window 2^24 or 2^22) or raw LZMA2 (preset 9e), whichever
   is smallest, written as text and executed by a four-line file::

       import brotli as B
       def D(s,n):return b''.join(...67 characters -> 57 bytes...)[:n]
       exec(B.decompress(D(r'...',54321)))
       raise SystemExit(main('sota',{...the run's differences from its preset...},__file__))

   Its size in bytes is ``bytes_code``. The codecs and the ``exec`` line are those of the records' wrappers (the
   2026-04-09 record's raw LZMA2, the 2026-04-27 records' brotli-11); the text is denser than their base85
   (:func:`text_encode`: 6.81 bits per byte of file against 6.41, 6% fewer bytes), still ASCII on one line.

The configuration is the preset name plus the fields where the run differed from its preset (paths left out:
``DATA_PATH``/``TOKENIZER_PATH``/``RUN_ID``/``RUN_DIR`` come from the environment, like the record scripts).
:func:`code_size_table` says what each packed module costs.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

ENTRY, ENTRY_NAME = "pgolf.quant.runner", "main"
# what the loader itself imports from the bundle (besides ENTRY_NAME): kept whether or not other code uses them
LOADER_NAMES = ((ENTRY, "submission_config"), ("pgolf.errors", "run_cli"), ("pgolf.errors", "ConfigError"),
                ("pgolf.train.config", "setting_name"))
DISPATCH = "pgolf.kernels"
# packing and benchmarking tools: never needed by a training run (pgolf.bench is imported only by kernel tuning)
EXCLUDE = frozenset({"pgolf.quant.bundle", "pgolf.quant.pack", "pgolf.quant.cli", "pgolf.quant.reach",
                     "pgolf.quant.specialize", "pgolf.bench"})
RUNTIME_FIELDS = frozenset({"data_path", "tokenizer_path", "run_dir", "run_id", "code_bytes", "force"})
DATA_GLOBS = ("**/tuned/*.json",)
MODULE_MARK = "#@"  # starts the line naming each module in T (a minified source has no comment lines)
CODECS = ("brotli", "lzma")
BROTLI_WINDOWS = (24, 22)  # 22: brotli's default, the 2026-04-27 records' wrapper
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the pgolf package


def build_train_gpt(train: Mapping[str, Any], model: Mapping[str, Any], *,
                    codec: str | None = None) -> tuple[str, str]:
    """(wrapped train_gpt.py text, readable program text with its configuration line) for a run's config dicts;
    codec None: the smaller of brotli and lzma."""
    prog = program(train, model)
    line = config_line(train, model)
    wrapped = wrap(prog, line, codec)
    readable = prog + line.replace(",__file__)", f",None,{len(wrapped.encode('utf-8'))})") + "\n"
    return wrapped, readable


def measure_code_bytes(cfg, model_cfg) -> int:
    """Counted code bytes of the bundle of a TrainConfig / GPTConfig pair (what pgolf-pack would write)."""
    wrapped, _ = build_train_gpt(cfg.to_dict(), model_cfg.to_dict())
    return len(wrapped.encode("utf-8"))


def program(train: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """The readable bundle program of a configuration (everything but the configuration line)."""
    preset, over = run_overrides(train, model)
    return _program(_stamp(), preset, json.dumps(over, sort_keys=True))


@dataclass(frozen=True)
class Packed:
    """The packed modules {name: (is_package, source)} and the pins (expression, outcome, field)."""

    modules: dict[str, tuple[bool, str]]
    pins: tuple[tuple[str, bool, str], ...]


def packed(train: Mapping[str, Any], model: Mapping[str, Any]) -> Packed:
    """What the program of this configuration holds (see the module docstring, steps 1-2)."""
    preset, over = run_overrides(train, model)
    return _packed(_stamp(), preset, json.dumps(over, sort_keys=True))


@functools.lru_cache(maxsize=8)
def _packed(stamp: tuple, preset: str, overrides: str) -> Packed:
    from pgolf.kernels import TRITON_MODULES
    from pgolf.quant.reach import reachable_sources
    from pgolf.quant.specialize import specialize

    t, m = _configs(preset, json.loads(overrides))
    trees = {name: (ast.parse(_path(name)[0].read_text(encoding="utf-8")), _path(name)[1])
             for name in module_closure()}
    pins = specialize({n: tree for n, (tree, _) in trees.items()}, t, m,
                      called_from_outside=[(ENTRY, ENTRY_NAME), *LOADER_NAMES])
    triton = {} if t.device == "cpu" else dict(TRITON_MODULES)
    mods = reachable_sources([(ENTRY, ENTRY_NAME), *LOADER_NAMES], trees.get, exclude=EXCLUDE, dispatch=DISPATCH,
                             op_modules=triton)
    return Packed(mods, tuple(_pin_row(p) for p in pins))


def _pin_row(p) -> tuple[str, bool, str]:
    """A pin as (Python expression over ``t``/``m``, the outcome it must have, the setting's field name)."""
    ref = f"{p.which[0]}.{p.field}"
    expr = ref if p.op == "truth" else f"{ref} {p.op} {p.value!r}"
    return expr, p.outcome, p.field


@functools.lru_cache(maxsize=8)
def _program(stamp: tuple, preset: str, overrides: str) -> str:
    pk = _packed(stamp, preset, overrides)
    text = "".join(f"{MODULE_MARK}{name}{'/' if is_pkg else ''}\n{src}" for name, (is_pkg, src) in pk.modules.items())
    if any(f"\n{MODULE_MARK}" in src for _, src in pk.modules.values()):
        raise ValueError(f"bundle: a packed module has a line starting with {MODULE_MARK!r}")
    raw = "'''" not in text and not text.endswith("\\")
    return (f"T=r'''{text}'''\n" if raw else f"T={text!r}\n") + f"P={list(pk.pins)!r}\nD={data_files()!r}\n" + _LOADER


_LOADER = '''import sys,os,importlib.abc,importlib.util,linecache,tempfile
S={}
for _b in T.split('\\n#@'):
 _n,_s=_b.lstrip('#@').split('\\n',1);S[_n.rstrip('/')]=(_n[-1]=='/',_s)
R='pgolf_bundle'
if D:
 R=tempfile.mkdtemp(prefix='pgolf_bundle_')
 for _k,_v in D.items():
  _p=os.path.join(R,_k);os.makedirs(os.path.dirname(_p),exist_ok=True)
  with open(_p,'w') as _f:_f.write(_v)
class _PgolfBundle(importlib.abc.MetaPathFinder,importlib.abc.Loader):
 def find_spec(self,name,path=None,target=None):
  if name in S:return importlib.util.spec_from_loader(name,self,is_package=S[name][0])
 def create_module(self,spec):return None
 def get_source(self,name):return S[name][1]
 def exec_module(self,m):
  n=m.__name__;p,src=S[n];f=os.path.join(R,*n.split('.'))+('/__init__.py' if p else '.py')
  linecache.cache[f]=(len(src),None,src.splitlines(True),f);m.__file__=f
  exec(compile(src,f,'exec'),m.__dict__)
sys.meta_path.insert(0,_PgolfBundle())
def main(p,o,s=None,n=0):
 from pgolf.quant import runner as r
 from pgolf.errors import run_cli,ConfigError
 from pgolf.train.config import setting_name
 def c():
  t,m=r.submission_config(p,o,os.environ)
  for e,w,f in P:
   if bool(eval(e,{'t':t,'m':m}))!=w:raise ConfigError(f"{setting_name(f)} is {getattr(t if e[0]=='t' else m,f)!r}: \\
this train_gpt.py was packed for a run where {e[2:]} is {w} and holds no code for that setting; pack a run that uses it")
 return run_cli('train_gpt.py',c) or r.main(p,o,s,n)
'''


def code_size_table(train: Mapping[str, Any], model: Mapping[str, Any]) -> list[tuple[str, int, int, int]]:
    """(module, source bytes, packed bytes, code bytes) per packed module, then the loader, pins and wrapper: a
    module's code bytes are its share of the compressed stream (brotli flushed after each module) in the wrapped
    file, and the rows add up to the file's size exactly."""
    import brotli

    pk = packed(train, model)
    prog = program(train, model)
    total = len(build_train_gpt(train, model)[0].encode("utf-8"))
    stream = brotli.Compressor(quality=11, lgwin=24)
    chunks = []
    for name, (_, src) in pk.modules.items():
        chunks.append(len(stream.process(f"{MODULE_MARK}{name}\n{src}".encode()) + stream.flush()))
    mods_text = sum(len(f"{MODULE_MARK}{n}{'/' if p else ''}\n{s}".encode()) for n, (p, s) in pk.modules.items())
    rest = len(stream.process(prog.encode()[mods_text:]) + stream.finish())
    payload = total - len(wrap("", config_line(train, model), "brotli").encode("utf-8"))
    scale = payload / (sum(chunks) + rest)
    rows = [(n, _path(n)[0].stat().st_size, len(src.encode()), round(c * scale))
            for (n, (_, src)), c in zip(pk.modules.items(), chunks)]
    return rows + [("(loader, pins, wrapper)", 0, len(prog.encode()) - sum(r[2] for r in rows),
                    total - sum(r[3] for r in rows))]


def format_code_table(rows: list[tuple[str, int, int, int]]) -> str:
    """The code size table: one line per packed module, then the total (= bytes_code)."""
    lines = [f"{'module':<34} {'source':>9} {'packed':>9} {'code bytes':>11}"]
    lines += [f"{n:<34} {raw:>9,} {small:>9,} {code:>11,}" for n, raw, small, code in rows]
    lines.append(f"{'total (train_gpt.py)':<34} {sum(r[1] for r in rows):>9,} {sum(r[2] for r in rows):>9,} "
                 f"{sum(r[3] for r in rows):>11,}")
    return "\n".join(lines)


# ---- the wrapper and the configuration line ---------------------------------------------------------------------

def wrap(prog: str, config_line: str, codec: str | None = None) -> str:
    """The wrapper file text: decompress + exec of ``prog``, then ``config_line``. codec None: the smaller one."""
    if codec is None:
        sizes = {c: len(_compressed(prog, c)) for c in CODECS}
        codec = min(sizes, key=lambda c: (sizes[c], c))
    data = _compressed(prog, codec)
    blob = f"D(r'{text_encode(data)}',{len(data)})"
    if codec == "brotli":
        head = f"import brotli as B\n{_DECODER}\nexec(B.decompress({blob}))\n"
    else:
        head = (f"import lzma as L\n{_DECODER}\nexec(L.decompress({blob},format=L.FORMAT_RAW,"
                f"filters=[{{'id':L.FILTER_LZMA2}}]))\n")
    return head + config_line + "\n"


# The wrapper's text: every 57 bytes (456 bits, little-endian) as 67 base-112 digits, least significant first (the
# last block as few as it needs), written with the ASCII characters that a one-line raw string holds, that no line
# splitter takes for a line break and that a terminal shows without changing its state: all but NUL, the quote,
# the backslash, LF, CR, VT, FF, FS, GS, RS, BEL, BS, SO, SI, ESC and DEL. 6.81 bits per character, base85 6.41.
TEXT_EXCLUDED = "\a\b\n\v\f\r\x0e\x0f\x1b\x1c\x1d\x1e'\\\x7f"
TEXT_ALPHABET = "".join(chr(c) for c in range(1, 128) if chr(c) not in TEXT_EXCLUDED)
BLOCK_BYTES, BLOCK_CHARS = 57, 67
_DECODER = (r"""def D(s,n):return b''.join(sum((ord(c)-1-sum(ord(c)>e for e in """
            r"""b"\a\b\n\v\f\r\x0e\x0f\x1b\x1c\x1d\x1e'\\"))*112**i for i,c in enumerate(s[j:j+67]))"""
            r""".to_bytes(57,'little')for j in range(0,len(s),67))[:n]""")


def text_encode(data: bytes) -> str:
    """``data`` as the wrapper's text (see :data:`TEXT_ALPHABET`); the wrapper's ``D(text, len(data))`` inverts it."""
    base = len(TEXT_ALPHABET)
    out = []
    for j in range(0, len(data), BLOCK_BYTES):
        n = int.from_bytes(data[j:j + BLOCK_BYTES], "little")
        digits = []
        while n or not digits:
            n, d = divmod(n, base)
            digits.append(TEXT_ALPHABET[d])
        last = j + BLOCK_BYTES >= len(data)
        out.append("".join(digits) if last else "".join(digits).ljust(BLOCK_CHARS, TEXT_ALPHABET[0]))
    return "".join(out)


def text_decode(text: str, n: int) -> bytes:
    """The bytes the wrapper's decoder reads from ``text`` (its own ``D``, executed): for tests and tools."""
    scope: dict[str, Any] = {}
    exec(_DECODER, scope)
    return scope["D"](text, n)


@functools.lru_cache(maxsize=8)
def _compressed(prog: str, codec: str) -> bytes:
    data = prog.encode("utf-8")
    if codec == "brotli":
        import brotli

        return min((brotli.compress(data, quality=11, lgwin=w) for w in BROTLI_WINDOWS), key=len)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")


def config_line(train: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """The wrapper's last line: run the packed configuration; its status is the program's exit status."""
    preset, over = run_overrides(train, model)
    return f"raise SystemExit(main({preset!r},{json.dumps(over, separators=(',', ':'), sort_keys=True)},__file__))"


def run_overrides(train: Mapping[str, Any], model: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(preset, {field: value}) where the run's config dicts differ from its preset (runtime paths left out).

    Checks that the preset plus these overrides resolve to exactly the run's configuration.
    """
    preset = train["preset"]
    base_t, base_m = _configs(preset, {})
    bt, bm = base_t.to_dict(), base_m.to_dict()
    out: dict[str, Any] = {}
    for d, base in ((train, bt), (model, bm)):
        for k, v in d.items():
            if k in RUNTIME_FIELDS or k == "preset":
                continue
            if k not in base:
                raise ValueError(f"bundle: the run's setting {k!r} is unknown to this pgolf")
            if _norm(v) != _norm(base[k]):
                out[k] = _norm(v)
    t2, m2 = _configs(preset, out)
    t2d, m2d = t2.to_dict(), m2.to_dict()
    for d, got in ((train, t2d), (model, m2d)):
        for k, v in d.items():
            if k not in RUNTIME_FIELDS and _norm(got[k]) != _norm(v):
                raise ValueError(f"bundle: cannot reproduce the run's {k}={v!r} from preset {preset!r}")
    return preset, out


def _configs(preset: str, overrides: Mapping[str, Any]):
    """(TrainConfig, GPTConfig) of ``preset`` with ``overrides`` (lists as tuples), no environment."""
    from pgolf.train.config import resolve

    return resolve(preset, env={}, flags={k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ---- the sources ------------------------------------------------------------------------------------------------

def module_closure(entry: str = ENTRY) -> list[str]:
    """Sorted names of the pgolf modules ``entry`` may import (statically, anywhere in a module, followed
    transitively, with parent packages) plus the Triton op modules the kernel dispatch imports by name: what
    :func:`packed` analyses."""
    from pgolf.kernels import TRITON_MODULES

    todo = [entry, *sorted(set(TRITON_MODULES.values()))]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen or any(name == x or name.startswith(x + ".") for x in EXCLUDE):
            continue
        found = _path(name)
        if found is None:
            if name in TRITON_MODULES.values():
                continue  # an op without a Triton module yet
            raise ModuleNotFoundError(f"bundle: pgolf module {name} has no source file under {ROOT}")
        seen.add(name)
        path, is_pkg = found
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += sorted(_imports(name, is_pkg, path.read_text(encoding="utf-8")) - seen)
    return sorted(seen)


def _path(name: str) -> tuple[Path, bool] | None:
    base = ROOT.joinpath(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py", True
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py"), False
    return None


def _imports(name: str, is_pkg: bool, src: str) -> set[str]:
    """pgolf modules named by the import statements of one module (absolute and relative)."""
    out: set[str] = set()
    pkg = name if is_pkg else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "pgolf")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = pkg.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod.split(".")[0] != "pgolf":
                continue
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names if _path(f"{mod}.{a.name}"))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module" and node.args \
                and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("pgolf."):
            out.add(node.args[0].value)
    return out


def data_files() -> dict[str, str]:
    """{path relative to ROOT: text} of the data files the bundled modules read (tuned kernel configs)."""
    out = {}
    for pattern in DATA_GLOBS:
        for p in sorted((ROOT / "pgolf").glob(pattern)):
            out[p.relative_to(ROOT).as_posix()] = p.read_text(encoding="utf-8")
    return out


def _stamp() -> tuple:
    """(path, mtime, size) of every pgolf source and data file: the key of the caches above."""
    files = sorted((ROOT / "pgolf").rglob("*.py")) + [ROOT / k for k in data_files()]
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def sources_digest() -> str:
    """SHA-256 over the sources of :func:`module_closure` (for a submission's provenance)."""
    h = hashlib.sha256()
    for name in module_closure():
        h.update(name.encode() + b"\0" + _path(name)[0].read_bytes() + b"\0")
    return h.hexdigest()


__all__ = ["ENTRY", "build_train_gpt", "measure_code_bytes", "program", "packed", "Packed", "code_size_table",
           "format_code_table", "wrap", "text_encode", "text_decode", "config_line", "run_overrides", "module_closure",
           "sources_digest"]
