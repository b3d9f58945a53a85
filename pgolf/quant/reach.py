"""What a packed run can reach: pgolf's sources cut down to the definitions its entry points can use.

:func:`reachable_sources` starts from named functions (the packed program's ``main`` and what its loader imports)
and follows names, never running anything: a module-level definition (function, class, constant, imported name) is
kept only when kept code names it, directly (``f``), through a module (``pgolf.kernels.mlp``,
``from pgolf.eval import evaluate``), or as a custom op (``torch.ops.pgolf.mlp_up_fwd`` names the function decorated
``custom_op("pgolf::mlp_up_fwd")``). A module is packed only when kept code imports it. What a module does when
imported (a registration call, a module-level ``if``/``try``, ``sys.modules`` surgery) is always kept, with three
exceptions that follow what they act on:

- ``X.register_fake`` / ``X.register_autograd`` / ``X.register_kernel`` on a custom op ``X`` stay with ``X``;
- ``pgolf.kernels.register(op, backend, fn)`` in an op's Triton module stays when the model's dispatch function
  ``pgolf.kernels.<op>`` is reached, and the op's Triton module (``pgolf.kernels.TRITON_MODULES``, imported by name
  at run time) is packed for exactly those ops, or for none when ``op_modules`` is empty (a CPU-only run);
- ``__all__``, ``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` blocks are dropped (nothing in a bundle
  star-imports, type-checks or runs a module as a script).

A kept class keeps its dunder methods, the methods whose names kept code reads as attributes (or as strings, for
``getattr``), and those its torch/stdlib base classes define (a framework may call them: ``forward``, ``backward``,
``step``, resolved by importing the base at pack time; a base that cannot be resolved keeps every method). It is
conservative where Python is dynamic: a module object used as a value (``getattr(reference, op)``) keeps that whole
module, a module-level ``__getattr__`` is always kept, and a module-level assignment whose value calls anything but
known value constructors or the module's own helpers counts as an import-time effect. A name that cannot be
resolved raises :class:`ReachError` instead of producing a program that would fail later.

The kept statements are minified: docstrings dropped, annotations dropped from functions whose decorators do not read
them (``custom_op`` and ``triton.jit`` do; dataclass fields keep theirs) and from module-level and local variables
(:func:`minify_tree`), then written with one space per level, no spaces a token does not need and simple statements
joined (:func:`compact`, kept only when it parses to the same tree). Semantics are unchanged.
"""

from __future__ import annotations

import ast
import io
import tokenize
from dataclasses import dataclass, field
from typing import Callable, Iterable

ROOT_PACKAGE = "pgolf"
ATTACHED_METHODS = frozenset({"register_fake", "register_autograd", "register_kernel", "register_torch_dispatch"})
PURE_DECORATORS = frozenset({"dataclass", "property", "staticmethod", "classmethod", "contextmanager", "lru_cache",
                             "cache", "cached_property", "wraps", "no_grad", "inference_mode", "jit",
                             "total_ordering", "setter", "getter", "deleter"})
KEEPS_ANNOTATIONS = frozenset({"custom_op", "jit", "dataclass", "register_fake"})
VALUE_CALLS = frozenset({"dict", "list", "tuple", "set", "frozenset", "int", "float", "str", "bool", "bytes",
                         "sorted", "range", "len", "min", "max", "zip", "enumerate", "sum", "any", "all", "abs",
                         "isinstance", "getattr", "Path", "compile", "Struct", "get", "fields", "field", "Kernel",
                         "by_dtype", "env_flag", "resolve", "parent", "TypeVar", "namedtuple", "dtype", "iinfo",
                         "finfo", "cast", "union", "join", "format", "items", "keys", "values", "encode"})


class ReachError(ValueError):
    """The sources name something the analysis cannot find (a bundle built from them would fail at run time)."""


@dataclass
class Unit:
    """One top-level statement of a module: the names it binds and whether it may be dropped."""

    stmt: ast.stmt
    binds: tuple[str, ...]
    pure: bool                       # droppable when no kept code names it
    attached_to: str | None = None   # kept exactly when this module-level name is kept
    registers_op: str | None = None  # pgolf.kernels.register(op, ...): kept when op's dispatch is reached
    live: bool = False
    live_aliases: set[int] = field(default_factory=set)  # import statements: the aliases kept
    live_methods: set[str] = field(default_factory=set)  # classes: the methods kept

    def methods(self) -> dict[str, list[ast.stmt]]:
        """A class's methods by name (a property and its setter share one)."""
        out: dict[str, list[ast.stmt]] = {}
        if isinstance(self.stmt, ast.ClassDef):
            for s in self.stmt.body:
                if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    out.setdefault(s.name, []).append(s)
        return out


@dataclass
class Module:
    """A parsed module: its units, who binds each top-level name, and which names are bound to pgolf modules."""

    name: str
    is_pkg: bool
    units: list[Unit]
    binders: dict[str, list[Unit]]
    aliases: dict[str, tuple[str, str | None]]  # name → (module, None) or (package, attribute) of a from-import
    custom_ops: dict[str, Unit]                 # "ns::op" → the decorated function's unit
    lazy_annotations: bool = False              # ``from __future__ import annotations``
    escaped: bool = False                       # used as a value: every unit kept

    def attached(self, name: str) -> list[Unit]:
        return [u for u in self.units if u.attached_to == name]


def reachable_sources(entries: Iterable[tuple[str, str]],
                      source: Callable[[str], tuple[ast.Module, bool] | None], *, exclude: Iterable[str] = (),
                      dispatch: str | None = None,
                      op_modules: dict[str, str] | None = None) -> dict[str, tuple[bool, str]]:
    """{module: (is_package, minified source)} of what the ``entries`` ((module, name) pairs) can reach.

    ``source(name)`` gives (parsed module, is_package) of a pgolf module or None (the tree is edited); ``exclude``:
    module names (and their submodules) never packed (imports of them are kept in place but not followed).
    ``dispatch`` / ``op_modules``: the kernel dispatch package and {op: Triton module}; an empty ``op_modules``
    packs no Triton module.
    """
    r = _Reach(source, tuple(exclude), dispatch, dict(op_modules or {}))
    for module, name in entries:
        r.need_name(module, name)
    r.run()
    return {name: (m.is_pkg, render(m)) for name, m in sorted(r.modules.items())}


class _Reach:
    """The work list: modules are parsed when first needed, units marked live, their references followed."""

    def __init__(self, source, exclude, dispatch, op_modules):
        self.source, self.exclude, self.dispatch, self.op_modules = source, exclude, dispatch, op_modules
        self.modules: dict[str, Module] = {}
        self.todo: list[tuple[Module, Unit, str | None]] = []   # (module, unit, method of a class unit or None)
        self.attrs: set[str] = set()                                   # attribute names kept code reads
        self.classes: list[tuple[Module, Unit]] = []                   # live classes
        self.bases_cache: dict[tuple[str, str], set[str] | None] = {}
        self.wanted_ops: set[str] = set()                              # torch.ops names kept code calls
        self.registrations: dict[str, list[tuple[Module, Unit]]] = {}  # op → its register(...) units

    def run(self) -> None:
        """Follow references until nothing new is kept, packing the Triton module of every reached op."""
        while True:
            while self.todo:
                m, u, method = self.todo.pop()
                if method is None:
                    self.follow(m, u)
                else:
                    for stmt in u.methods()[method]:
                        self.follow_stmt(m, stmt)
            reached = [mod for op, mod in sorted(self.op_modules.items())
                       if mod not in self.modules and self.dispatch_live(op)]
            if not reached:
                return
            for mod in reached:
                self.need_module(mod)

    # ---- modules and names

    def excluded(self, name: str) -> bool:
        return any(name == x or name.startswith(x + ".") for x in self.exclude)

    def is_module(self, name: str) -> bool:
        return not self.excluded(name) and self.source(name) is not None

    def need_module(self, name: str) -> Module | None:
        """The parsed module (its import-time effects kept from now on); None for an excluded one."""
        if self.excluded(name):
            return None
        if name in self.modules:
            return self.modules[name]
        found = self.source(name)
        if found is None:
            raise ReachError(f"no source for pgolf module {name}")
        if "." in name:
            self.need_module(name.rpartition(".")[0])
        m = self.modules[name] = parse_module(name, found[1], found[0])
        for u in m.units:
            if u.registers_op is not None:
                self.registrations.setdefault(u.registers_op, []).append((m, u))
                if self.dispatch_live(u.registers_op):
                    self.mark(m, u)
            elif not u.pure and u.attached_to is None:
                self.mark(m, u)
        for key in self.wanted_ops & set(m.custom_ops):
            self.mark(m, m.custom_ops[key])
        for n in ("__getattr__", "__dir__"):
            for u in m.binders.get(n, ()):
                self.mark(m, u)
        return m

    def dispatch_live(self, op: str) -> bool:
        d = self.modules.get(self.dispatch or "")
        return d is not None and any(u.live for u in d.binders.get(op, ()))

    def need_name(self, module: str, name: str) -> None:
        """Keep what ``from module import name`` gives: its binding statement(s), or the submodule of that name."""
        m = self.need_module(module)
        if m is None:
            return
        for u in m.binders.get(name, ()):
            self.mark(m, u, alias=name)
        sub = f"{module}.{name}"
        defined = any(not isinstance(u.stmt, (ast.Import, ast.ImportFrom)) for u in m.binders.get(name, ()))
        if not defined and self.is_module(sub):
            self.need_module(sub)
        elif name not in m.binders and "__getattr__" not in m.binders:
            raise ReachError(f"{module} has no top-level name {name!r} (and no submodule of that name)")

    def module_of(self, m: Module, name: str, local: dict) -> str | None:
        """The pgolf module ``name`` is bound to in ``m`` (``local``: the unit's own imports), else None."""
        spec = local.get(name) or m.aliases.get(name)
        if spec is None:
            return None
        base, attr = spec
        if attr is None:
            return base
        target = self.need_module(base)
        if target is None:
            return None
        if attr in target.aliases and target.aliases[attr] != spec:
            return self.module_of(target, attr, {})
        defined = any(not isinstance(u.stmt, (ast.Import, ast.ImportFrom)) for u in target.binders.get(attr, ()))
        return f"{base}.{attr}" if not defined and self.is_module(f"{base}.{attr}") else None

    def escape(self, module: str) -> None:
        """``module`` is used as a value (``getattr(module, name)``): keep all of it."""
        m = self.need_module(module)
        if m is not None and not m.escaped:
            m.escaped = True
            for u in m.units:
                if u.registers_op is None:
                    self.mark(m, u)

    def mark(self, m: Module, u: Unit, alias: str | None = None) -> None:
        """Keep ``u`` (of an import statement: the alias binding ``alias``, or all) and queue its references."""
        if isinstance(u.stmt, (ast.Import, ast.ImportFrom)):
            picked = {i for i, a in enumerate(u.stmt.names) if alias is None or _bound(a) == alias}
            if picked <= u.live_aliases:
                return
            u.live, u.live_aliases = True, u.live_aliases | picked
            self.todo.append((m, u, None))
            return
        if u.live:
            return
        u.live = True
        self.todo.append((m, u, None))
        if isinstance(u.stmt, ast.ClassDef):
            self.classes.append((m, u))
        for n in u.binds:
            for a in m.attached(n):
                self.mark(m, a)
            if m.name == self.dispatch:
                for rm, ru in self.registrations.get(n, ()):
                    self.mark(rm, ru)

    # ---- the references of one kept unit

    def follow(self, m: Module, u: Unit) -> None:
        stmt = u.stmt
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            for i in sorted(u.live_aliases):
                self.follow_import(m, stmt, stmt.names[i])
            return
        if not isinstance(stmt, ast.ClassDef):
            self.follow_stmt(m, stmt)
            return
        methods = u.methods()
        body = [s for s in stmt.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))]
        if m.lazy_annotations:  # not evaluated unless someone asks typing.get_type_hints: keep the names they use
            for s in body:      # that cost nothing (typing, torch, a type alias), never pgolf code just for them
                if isinstance(s, ast.AnnAssign):
                    for n in ast.walk(s.annotation):
                        if isinstance(n, ast.Name) and n.id not in m.aliases and m.binders.get(n.id) and all(
                                isinstance(u.stmt, (ast.Import, ast.ImportFrom, ast.Assign, ast.AnnAssign))
                                for u in m.binders[n.id]):
                            self.keep_binding(m, n.id)
            body = [ast.Expr(s.value) if isinstance(s, ast.AnnAssign) and s.value else ast.Pass()
                    if isinstance(s, ast.AnnAssign) else s for s in body]
        shell = ast.ClassDef(name=stmt.name, bases=stmt.bases, keywords=stmt.keywords,
                             decorator_list=stmt.decorator_list, body=body)
        self.follow_stmt(m, shell)
        protocol = self.protocol(m, stmt)
        named = {n.id for s in shell.body for n in ast.walk(s) if isinstance(n, ast.Name)}
        for name in methods:
            if name.startswith("__") or name in self.attrs or name in named or protocol is None or name in protocol:
                self.mark_method(m, u, name)

    def mark_method(self, m: Module, u: Unit, name: str) -> None:
        if name not in u.live_methods:
            u.live_methods.add(name)
            self.todo.append((m, u, name))

    def protocol(self, m: Module, cls: ast.ClassDef) -> set[str] | None:
        """Method names the external base classes define (a framework may call them: ``forward``, ``backward``,
        ``step``...); None when a base cannot be resolved (then every method is kept)."""
        key = (m.name, cls.name)
        if key not in self.bases_cache:
            self.bases_cache[key] = _external_protocol(m, cls)
        return self.bases_cache[key]

    def follow_stmt(self, m: Module, stmt: ast.stmt) -> None:
        refs = References(m, stmt)
        new = refs.attrs - self.attrs
        if new:
            self.attrs |= new
            for cm, cu in self.classes:
                for name in new & set(cu.methods()):
                    self.mark_method(cm, cu, name)
        for node in refs.imports:
            for a in node.names:
                self.follow_import(m, node, a)
        for name in sorted(refs.names):
            if name in m.binders and name not in refs.local:
                self.keep_binding(m, name)
            module = self.module_of(m, name, refs.local)
            if module is not None:
                self.escape(module)
        for chain in sorted(refs.chains):
            self.follow_chain(m, refs, chain)

    def keep_binding(self, m: Module, name: str) -> None:
        for u in m.binders[name]:
            self.mark(m, u, alias=name)

    def follow_import(self, m: Module, node: ast.Import | ast.ImportFrom, a: ast.alias) -> None:
        if isinstance(node, ast.Import):
            if a.name.split(".")[0] == ROOT_PACKAGE:
                self.need_module(a.name)
            return
        base = _absolute(m.name, m.is_pkg, node)
        if base.split(".")[0] != ROOT_PACKAGE or self.excluded(base):
            return
        if a.name == "*":
            self.escape(base)
        else:
            self.need_name(base, a.name)

    def follow_chain(self, m: Module, refs: "References", chain: tuple[str, ...]) -> None:
        """``a.b.c``: keep ``a``'s binding; when ``a`` is a pgolf module, what ``b`` (then ``c``...) is in it."""
        head = chain[0]
        if head == "torch" and len(chain) >= 4 and chain[1] == "ops":
            self.need_custom_op(f"{chain[2]}::{chain[3]}")
            return
        if head in m.binders and head not in refs.local:
            self.keep_binding(m, head)
        module = self.module_of(m, head, refs.local)
        if module is None:
            return
        for attr in chain[1:]:
            target = self.need_module(module)
            if target is None:
                return
            if attr in target.binders:
                self.need_name(module, attr)
                sub = self.module_of(target, attr, {})
                if sub is None:
                    return
                module = sub
                continue
            if not self.is_module(f"{module}.{attr}"):
                if "__getattr__" in target.binders:
                    return
                raise ReachError(f"{m.name}: {'.'.join(chain)}: {module} has no name {attr!r}")
            module = f"{module}.{attr}"
        self.need_module(module)

    def need_custom_op(self, key: str) -> None:
        self.wanted_ops.add(key)
        for other in list(self.modules.values()):
            if key in other.custom_ops:
                self.mark(other, other.custom_ops[key])


# ---- parsing a module into units ------------------------------------------------------------------------------

def parse_module(name: str, is_pkg: bool, tree: ast.Module) -> Module:
    """The module's top-level statements as units (after docstrings and unread annotations are dropped)."""
    tree = minify_tree(tree)
    units: list[Unit] = []
    binders: dict[str, list[Unit]] = {}
    aliases: dict[str, tuple[str, str | None]] = {}
    ops: dict[str, Unit] = {}
    for stmt in tree.body:
        if _dropped(stmt):
            continue
        u = _unit(name, is_pkg, stmt, aliases)
        units.append(u)
        for n in u.binds:
            binders.setdefault(n, []).append(u)
        op = _custom_op_name(stmt)
        if op:
            ops[op] = u
    for u in units:  # an attachment to a name this module does not define is an ordinary effect
        if u.attached_to is not None and u.attached_to not in binders:
            u.attached_to = None
    lazy = any(isinstance(s, ast.ImportFrom) and s.module == "__future__" and
               any(a.name == "annotations" for a in s.names) for s in tree.body)
    return Module(name, is_pkg, units, binders, aliases, ops, lazy)


def _dropped(stmt: ast.stmt) -> bool:
    """``__all__`` statements, ``if TYPE_CHECKING:`` and ``if __name__ == "__main__":`` blocks."""
    if isinstance(stmt, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        return all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets)
    if isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Name) and stmt.test.id == "TYPE_CHECKING":
        return not stmt.orelse
    if isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare) and not stmt.orelse:
        t = stmt.test
        return isinstance(t.left, ast.Name) and t.left.id == "__name__" and len(t.comparators) == 1 \
            and isinstance(t.comparators[0], ast.Constant) and t.comparators[0].value == "__main__"
    return False


def _unit(mod: str, is_pkg: bool, stmt: ast.stmt, aliases: dict) -> Unit:
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        _record_aliases(mod, is_pkg, stmt, aliases)
        ours = isinstance(stmt, ast.Import) and all(a.name.split(".")[0] == ROOT_PACKAGE for a in stmt.names)
        effect = (isinstance(stmt, ast.Import) and not ours) or getattr(stmt, "module", None) == "__future__"
        return Unit(stmt, tuple(_bound(a) for a in stmt.names), pure=not effect)
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        attached = next((_base_name(d) for d in stmt.decorator_list if _last_name(d) in ATTACHED_METHODS), None)
        pure = all(_last_name(d) in PURE_DECORATORS or _last_name(d) == "custom_op" for d in stmt.decorator_list)
        return Unit(stmt, (stmt.name,), pure=pure and attached is None, attached_to=attached)
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        names = tuple(n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name))
        simple = all(isinstance(t, (ast.Name, ast.Tuple)) for t in targets)
        imported = _import_module_call(stmt.value)
        if imported and len(names) == 1:
            aliases[names[0]] = (imported, None)
            return Unit(stmt, names, pure=False)
        return Unit(stmt, names, pure=simple and stmt.value is not None and _pure_value(stmt.value))
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call):
        call = stmt.value
        if _last_name(call.func) in ATTACHED_METHODS and isinstance(call.func, ast.Attribute):
            return Unit(stmt, (), pure=False, attached_to=_base_name(call.func))
        if _last_name(call.func) == "register" and call.args and isinstance(call.args[0], ast.Constant) \
                and isinstance(call.args[0].value, str):
            return Unit(stmt, (), pure=False, registers_op=call.args[0].value)
    bound = {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    bound |= {d.name for d in ast.walk(stmt) if isinstance(d, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    return Unit(stmt, tuple(sorted(bound)), pure=False)


def _record_aliases(mod: str, is_pkg: bool, stmt, aliases: dict) -> None:
    """Names this import statement binds to pgolf modules, or to pgolf names that may be modules."""
    for a in stmt.names:
        if isinstance(stmt, ast.Import):
            if a.name.split(".")[0] == ROOT_PACKAGE:
                aliases[_bound(a)] = (a.name if a.asname else ROOT_PACKAGE, None)
        else:
            base = _absolute(mod, is_pkg, stmt)
            if base.split(".")[0] == ROOT_PACKAGE and a.name != "*":
                aliases[_bound(a)] = (base, a.name)


def _pure_value(node: ast.expr) -> bool:
    """No call in ``node`` but to value constructors or to the module's own helpers (names starting with '_')."""
    for n in ast.walk(node):
        if isinstance(n, ast.Call) and _last_name(n.func) not in VALUE_CALLS \
                and not (isinstance(n.func, ast.Name) and n.func.id.startswith("_")):
            return False
        if isinstance(n, (ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)):
            return False
    return True


def _import_module_call(node) -> str | None:
    if isinstance(node, ast.Call) and _last_name(node.func) == "import_module" and node.args \
            and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str) \
            and node.args[0].value.split(".")[0] == ROOT_PACKAGE:
        return node.args[0].value
    return None


def _custom_op_name(stmt: ast.stmt) -> str | None:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
        for d in stmt.decorator_list:
            if isinstance(d, ast.Call) and _last_name(d.func) == "custom_op" and d.args \
                    and isinstance(d.args[0], ast.Constant):
                return str(d.args[0].value)
    return None


class References:
    """What one statement names: plain names, attribute chains on names, and its own (nested) imports."""

    def __init__(self, m: Module, stmt: ast.stmt):
        self.names: set[str] = set()
        self.chains: set[tuple[str, ...]] = set()
        self.imports: list[ast.Import | ast.ImportFrom] = []
        self.local: dict[str, tuple[str, str | None]] = {}
        self.attrs: set[str] = set()   # attribute names read, and strings that could name one (getattr)
        bases: set[int] = set()
        for node in ast.walk(stmt):
            if isinstance(node, ast.Attribute):
                self.attrs.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.isidentifier():
                self.attrs.add(node.value)
            if isinstance(node, ast.Attribute) and id(node) not in bases:
                chain, names = _chain(node)
                if chain:
                    self.chains.add(chain)
                    bases.update(names)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                self.imports.append(node)
                _record_aliases(m.name, m.is_pkg, node, self.local)
        for node in ast.walk(stmt):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and id(node) not in bases:
                self.names.add(node.id)


def _chain(node: ast.Attribute) -> tuple[tuple[str, ...] | None, set[int]]:
    """(('a', 'b', 'c'), ids of the inner nodes) for ``a.b.c``; (None, ...) when the innermost is not a name."""
    parts, seen = [], set()
    cur: ast.expr = node
    while isinstance(cur, ast.Attribute):
        parts.append(cur.attr)
        seen.add(id(cur))
        cur = cur.value
    if not isinstance(cur, ast.Name):
        return None, set()
    seen.add(id(cur))
    return (cur.id, *reversed(parts)), seen


def _last_name(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _base_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Call):
        node = node.func
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        return node.value.id
    return None


def _bound(a: ast.alias) -> str:
    return a.asname or a.name.split(".")[0]


def _absolute(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    parts = (mod if is_pkg else mod.rpartition(".")[0]).split(".")
    base = ".".join(parts[: len(parts) - node.level + 1])
    return f"{base}.{node.module}" if node.module else base


def _external_protocol(m: Module, cls: ast.ClassDef) -> set[str] | None:
    """Names defined by ``cls``'s bases outside pgolf (resolved by importing what the module imports), or None."""
    names: set[str] = set()
    ns: dict | None = None
    for base in cls.bases:
        chain = _chain(base)[0] if isinstance(base, ast.Attribute) else \
            (base.id,) if isinstance(base, ast.Name) else None
        if chain is None:
            return None
        if chain[0] in m.binders and chain[0] not in m.aliases and len(chain) == 1 and \
                all(isinstance(u.stmt, ast.ClassDef) for u in m.binders[chain[0]]):
            continue  # a class of this module: what it defines is reached like any attribute
        if chain[0] in m.aliases:
            continue  # a pgolf class (or module attribute) imported here
        if ns is None:
            ns = _import_namespace(m)
        try:
            obj = ns[chain[0]]
            for attr in chain[1:]:
                obj = getattr(obj, attr)
        except (KeyError, AttributeError):
            return None
        if not isinstance(obj, type):
            return None
        names |= set(dir(obj))
    return names


def _import_namespace(m: Module) -> dict:
    """The names the module's own non-pgolf imports bind (imported here, at pack time)."""
    ns: dict = {}
    for u in m.units:
        s = u.stmt
        if isinstance(s, (ast.Import, ast.ImportFrom)) and getattr(s, "module", None) != "__future__" and \
                not any(_bound(a) in m.aliases for a in s.names):
            try:
                exec(compile(ast.fix_missing_locations(ast.Module(body=[s], type_ignores=[])), m.name, "exec"), ns)
            except Exception:  # an optional dependency missing here: that base stays unresolved
                pass
    return ns


# ---- writing the kept statements back -------------------------------------------------------------------------

def render(m: Module) -> str:
    """The module's kept statements as minified source."""
    body = []
    for u in m.units:
        if not (u.live or (m.escaped and u.registers_op is None)):
            continue
        stmt = u.stmt
        if isinstance(stmt, (ast.Import, ast.ImportFrom)) and u.pure:
            names = [a for i, a in enumerate(stmt.names) if i in u.live_aliases]
            if not names:
                continue
            stmt = type(stmt)(**{**{f: getattr(stmt, f) for f in stmt._fields}, "names": names})
        elif isinstance(stmt, ast.ClassDef) and not m.escaped:
            kept = [s for s in stmt.body
                    if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) or s.name in u.live_methods]
            stmt = ast.ClassDef(**{**{f: getattr(stmt, f) for f in stmt._fields}, "body": kept or [ast.Pass()]})
        body.append(stmt)
    tree = ast.Module(body=body or [ast.Pass()], type_ignores=[])
    return compact(ast.unparse(ast.fix_missing_locations(tree))) + "\n"


def minify_tree(tree: ast.Module) -> ast.Module:
    """Docstrings and unread annotations dropped (see the module docstring)."""
    keep_doc = any(isinstance(n, ast.Name) and n.id == "__doc__" for n in ast.walk(tree))
    tree = _StripDocstrings(keep_doc).visit(tree)
    return ast.fix_missing_locations(_StripAnnotations().visit(tree))


COMPOUND = ("if ", "elif ", "else", "for ", "while ", "with ", "try", "except", "finally", "def ", "class ",
            "async ", "@", "match ", "case ")


def compact(src: str) -> str:
    """``src`` (as ``ast.unparse`` writes it: one statement per line, four spaces per level) with one space per
    level, no spaces between tokens that do not need one, consecutive simple statements joined by ``;`` and a
    block of one line of simple statements put on its header's line. Returned unchanged unless the result parses
    to the same tree."""
    lines = []
    try:
        for line in src.split("\n"):
            body = line.lstrip(" ")
            if body:
                lines.append(" " * (_indent(line) // 4) + _compact_line(body))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        return src
    joined: list[str] = []
    for line in lines:
        if joined and _simple(line) and _simple(joined[-1]) and _indent(line) == _indent(joined[-1]):
            joined[-1] += ";" + line.strip()
        else:
            joined.append(line)
    out, i = [], 0
    while i < len(joined):
        line = joined[i]
        if line.endswith(":") and i + 1 < len(joined) and _indent(joined[i + 1]) > _indent(line) \
                and _simple(joined[i + 1]) and (i + 2 == len(joined) or _indent(joined[i + 2]) <= _indent(line)):
            out.append(line + joined[i + 1].strip())
            i += 2
        else:
            out.append(line)
            i += 1
    new = "\n".join(out)
    try:
        same = ast.dump(ast.parse(new)) == ast.dump(ast.parse(src))
    except SyntaxError:
        same = False
    return new if same else src


def _compact_line(line: str) -> str:
    out, prev = "", None
    for tok in tokenize.generate_tokens(io.StringIO(line).readline):
        if tok.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER, tokenize.INDENT, tokenize.DEDENT,
                        tokenize.COMMENT):
            continue
        text = _short_number(tok.string) if tok.type == tokenize.NUMBER else tok.string
        if out and (_word(out[-1]) and (_word(text[0]) or text[0] in "'\"")
                    or (prev == tokenize.NUMBER and (_word(text[0]) or text[0] == "."))
                    or (out[-1] == "." and text[0].isdigit())):
            out += " "
        out += text
        prev = tok.type
    return out


def _short_number(text: str) -> str:
    if len(text) > 2 and text.startswith("0.") and text[2:].isdigit():
        return text[1:]
    if text.endswith(".0") and text[:-2].isdigit():
        return text[:-1]
    return text


def _word(c: str) -> bool:
    return c.isalnum() or c == "_" or ord(c) > 127


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _simple(line: str) -> bool:
    body = line.strip()
    return bool(body) and not body.startswith(COMPOUND) and not body.endswith(":")


class _StripDocstrings(ast.NodeTransformer):
    """Drop string-constant expression statements (docstrings, attribute docs); keep bodies non-empty."""

    def __init__(self, keep_module_doc: bool):
        self.keep_module_doc = keep_module_doc

    def visit_Module(self, node):
        self.generic_visit(node)
        doc = node.body[:1] if self.keep_module_doc and node.body and _is_doc(node.body[0]) else []
        node.body = doc + [s for s in node.body if not _is_doc(s)] if not doc else doc + [
            s for s in node.body[1:] if not _is_doc(s)]
        return node

    def generic_visit(self, node):
        super().generic_visit(node)
        if isinstance(node, ast.Module):
            return node
        for name in ("body", "orelse", "finalbody"):
            stmts = getattr(node, name, None)
            if isinstance(stmts, list) and stmts and all(isinstance(s, ast.stmt) for s in stmts):
                kept = [s for s in stmts if not _is_doc(s)]
                setattr(node, name, kept or ([ast.Pass()] if name == "body" else []))
        return node


def _is_doc(s: ast.stmt) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)


class _StripAnnotations(ast.NodeTransformer):
    """Annotations nothing reads: of functions whose decorators do not inspect them, and of variables outside class
    bodies (dataclass fields keep theirs)."""

    def visit_FunctionDef(self, node):
        if not any(_last_name(d) in KEEPS_ANNOTATIONS for d in node.decorator_list):
            a = node.args
            for arg in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg]:
                if arg is not None:
                    arg.annotation = None
            node.returns = None
        self.generic_visit(node)
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node):
        for s in node.body:  # class-level annotations (dataclass fields) stay; methods are visited
            if not isinstance(s, ast.AnnAssign):
                self.visit(s)
        return node

    def visit_AnnAssign(self, node):
        if node.value is None:
            return node
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value), node)


__all__ = ["reachable_sources", "minify_tree", "compact", "ReachError"]
