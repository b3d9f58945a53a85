"""The self-contained ``train_gpt.py``: pgolf's own modules embedded in one file, and its counted size.

Design:

- **Which modules**: the static import closure of :mod:`pgolf.quant.runner` (every ``import pgolf...`` /
  ``from pgolf... import ...``, module-level or inside functions, followed transitively, plus each module's parent
  packages) and the Triton op modules the kernel dispatch imports by name (``pgolf.kernels.TRITON_MODULES``).
  Packing tools (this module, :mod:`pgolf.quant.pack`) are left out; they are only imported when not bundled.
- **Program** (readable): a dict ``S = {module name: (is_package, source)}``, a ``sys.meta_path`` finder/loader
  that serves those names (inserted first, so an installed pgolf is never used), and ``from pgolf.quant.runner
  import main``. Sources are registered in :mod:`linecache` under their module path so ``inspect.getsource``
  (used by ``triton.jit``) works. Data files next to the modules (``pgolf/**/tuned/*.json``, the kernels' tuned
  configs) are embedded too and written to a temporary folder that the modules' ``__file__`` points into.
- **Minify** (default on): ``ast`` round trip, which drops comments and docstrings (a module docstring is kept when
  the module reads ``__doc__``); semantics are unchanged.
- **Wrapper**: ``brotli`` (quality 11, window 2^24; ``lzma`` raw LZMA2 as an option) → base85 → a three-line file::

      import brotli as B,base64 as b
      exec(B.decompress(b.b85decode("...")))
      raise SystemExit(main('sota',{...the run's differences from its preset...},__file__))

  Its size in bytes is the counted code size (``bytes_code``).

The run configuration is the preset name plus the fields where the run differed from its preset (paths left out:
``DATA_PATH``/``TOKENIZER_PATH``/``RUN_ID``/``RUN_DIR`` come from the environment, like the record scripts).
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import json
import lzma
from pathlib import Path
from typing import Any, Mapping

ENTRY = "pgolf.quant.runner"
# packing and benchmarking tools: never needed by a training run (pgolf.bench is imported only by kernel tuning)
EXCLUDE = frozenset({"pgolf.quant.bundle", "pgolf.quant.pack", "pgolf.quant.cli", "pgolf.bench"})
RUNTIME_FIELDS = frozenset({"data_path", "tokenizer_path", "run_dir", "run_id", "code_bytes", "force"})
DATA_GLOBS = ("**/tuned/*.json",)
ROOT = Path(__file__).resolve().parents[2]  # the folder holding the pgolf package


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
    return out


def module_closure(entry: str = ENTRY) -> list[str]:
    """Sorted names of the pgolf modules a bundle of ``entry`` needs (see the module docstring)."""
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


class _StripDocstrings(ast.NodeTransformer):
    """Drop string-constant expression statements (docstrings, attribute docs); keep bodies non-empty."""

    def __init__(self, keep_module_doc: bool):
        self.keep_module_doc = keep_module_doc

    def _clean(self, node, keep_first: bool = False):
        body = [s for i, s in enumerate(node.body)
                if (keep_first and i == 0) or not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                    and isinstance(s.value.value, str))]
        node.body = body or [ast.Pass()]
        return node

    def visit_Module(self, node):
        self.generic_visit(node)
        return self._clean(node, keep_first=self.keep_module_doc)

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            if not isinstance(node, ast.Module) and isinstance(getattr(node, field, None), list) \
                    and getattr(node, field) and all(isinstance(s, ast.stmt) for s in getattr(node, field)):
                kept = [s for s in getattr(node, field)
                        if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                and isinstance(s.value.value, str))]
                if field == "body" and not kept:
                    kept = [ast.Pass()]
                setattr(node, field, kept)
        return node


def minify(src: str) -> str:
    """Source without comments and docstrings (an ``ast`` round trip; the module docstring stays if ``__doc__`` is
    used)."""
    tree = ast.parse(src)
    keep = "__doc__" in src and bool(tree.body) and isinstance(tree.body[0], ast.Expr) \
        and isinstance(getattr(tree.body[0], "value", None), ast.Constant)
    tree = _StripDocstrings(keep).visit(tree)
    return ast.unparse(tree) + "\n"


def data_files() -> dict[str, str]:
    """{path relative to ROOT: text} of the data files the bundled modules read (tuned kernel configs)."""
    out = {}
    for pattern in DATA_GLOBS:
        for p in sorted((ROOT / "pgolf").glob(pattern)):
            out[p.relative_to(ROOT).as_posix()] = p.read_text(encoding="utf-8")
    return out


_LOADER = '''import sys,os,importlib.abc,importlib.util,linecache,tempfile
R='pgolf_bundle'
if D:
 R=tempfile.mkdtemp(prefix='pgolf_bundle_')
 for _k,_v in D.items():
  _p=os.path.join(R,_k);os.makedirs(os.path.dirname(_p),exist_ok=True)
  with open(_p,'w') as _f:_f.write(_v)
class _PgolfBundle(importlib.abc.MetaPathFinder,importlib.abc.Loader):
 def find_spec(self,name,path=None,target=None):
  if name in S:return importlib.util.spec_from_loader(name,self,is_package=bool(S[name][0]))
 def create_module(self,spec):return None
 def get_source(self,name):return S[name][1]
 def exec_module(self,m):
  n=m.__name__;p,src=S[n];f=os.path.join(R,*n.split('.'))+('/__init__.py' if p else '.py')
  linecache.cache[f]=(len(src),None,src.splitlines(True),f);m.__file__=f
  exec(compile(src,f,'exec'),m.__dict__)
sys.meta_path.insert(0,_PgolfBundle())
from pgolf.quant.runner import main
'''


def _stamp() -> tuple:
    """(path, mtime, size) of every pgolf source and data file: the key of the caches below."""
    files = sorted((ROOT / "pgolf").rglob("*.py")) + [ROOT / k for k in data_files()]
    return tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in files)


def program(minified: bool = True) -> str:
    """The readable bundle program (everything but the configuration line)."""
    return _program(_stamp(), minified)


@functools.lru_cache(maxsize=2)
def _program(stamp: tuple, minified: bool) -> str:
    mods = {}
    for name in module_closure():
        path, is_pkg = _path(name)
        src = path.read_text(encoding="utf-8")
        mods[name] = (int(is_pkg), minify(src) if minified else src)
    return f"S={mods!r}\nD={data_files()!r}\n" + _LOADER


def run_overrides(train: Mapping[str, Any], model: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(preset, {field: value}) where the run's config dicts differ from its preset (runtime paths left out).

    Checks that the preset plus these overrides resolve to exactly the run's configuration.
    """
    from pgolf.train.config import resolve

    preset = train["preset"]
    base_t, base_m = resolve(preset, env={}, flags={})
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
    t2, m2 = resolve(preset, env={}, flags={k: tuple(v) if isinstance(v, list) else v for k, v in out.items()})
    t2d, m2d = t2.to_dict(), m2.to_dict()
    for d, got in ((train, t2d), (model, m2d)):
        for k, v in d.items():
            if k not in RUNTIME_FIELDS and _norm(got[k]) != _norm(v):
                raise ValueError(f"bundle: cannot reproduce the run's {k}={v!r} from preset {preset!r}")
    return preset, out


def _norm(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


@functools.lru_cache(maxsize=4)
def _compressed(prog: str, codec: str) -> bytes:
    data = prog.encode("utf-8")
    if codec == "brotli":
        import brotli

        return brotli.compress(data, quality=11, lgwin=24)
    if codec == "lzma":
        return lzma.compress(data, format=lzma.FORMAT_RAW,
                             filters=[{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}])
    raise ValueError(f"codec must be 'brotli' or 'lzma', got {codec!r}")


def wrap(prog: str, config_line: str, codec: str | None = "brotli") -> str:
    """The wrapper file text: decompress + exec of ``prog``, then ``config_line``. codec None: the smaller one
    (brotli measured smaller than lzma on these sources: 82.7 KB against 84.1 KB)."""
    if codec is None:
        sizes = {c: len(_compressed(prog, c)) for c in ("brotli", "lzma")}
        codec = min(sizes, key=lambda c: (sizes[c], c))
    blob = base64.b85encode(_compressed(prog, codec)).decode("ascii")
    if codec == "brotli":
        head = f'import brotli as B,base64 as b\nexec(B.decompress(b.b85decode("{blob}")))\n'
    else:
        head = ('import lzma as L,base64 as b\nexec(L.decompress(b.b85decode("' + blob + '"),format=L.FORMAT_RAW,'
                'filters=[{"id":L.FILTER_LZMA2}]))\n')
    return head + config_line + "\n"


def config_line(train: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """The wrapper's last line: run the packed configuration; its status is the program's exit status."""
    preset, over = run_overrides(train, model)
    return f"raise SystemExit(main({preset!r},{json.dumps(over, separators=(',', ':'), sort_keys=True)},__file__))"


def build_train_gpt(train: Mapping[str, Any], model: Mapping[str, Any], *, minified: bool = True,
                    codec: str | None = "brotli") -> tuple[str, str]:
    """(wrapped train_gpt.py text, readable program text with its configuration line)."""
    prog = program(minified)
    line = config_line(train, model)
    wrapped = wrap(prog, line, codec)
    readable = prog + line.replace(",__file__)", f",None,{len(wrapped.encode('utf-8'))})") + "\n"
    return wrapped, readable


def measure_code_bytes(cfg, model_cfg) -> int:
    """Counted code bytes of the bundle of a TrainConfig / GPTConfig pair (what pgolf-pack would write)."""
    wrapped, _ = build_train_gpt(cfg.to_dict(), model_cfg.to_dict())
    return len(wrapped.encode("utf-8"))


def sources_digest() -> str:
    """SHA-256 over the bundled module sources (for a submission's provenance)."""
    h = hashlib.sha256()
    for name in module_closure():
        h.update(name.encode() + b"\0" + _path(name)[0].read_bytes() + b"\0")
    return h.hexdigest()


__all__ = ["ENTRY", "module_closure", "minify", "program", "run_overrides", "wrap", "config_line",
           "build_train_gpt", "measure_code_bytes", "sources_digest"]
