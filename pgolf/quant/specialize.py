"""pgolf's sources specialized to one packed configuration: branches on what the run fixed are decided at pack time.

:func:`specialize` rewrites the parsed modules in place. A test (of an ``if``, an ``elif`` or a conditional
expression) that reads only settings of the packed run and constants is evaluated, and the branch not taken is
dropped, together with the statements a taken ``return``/``raise`` makes unreachable:

- **Settings.** ``cfg.eval_stride``, ``run.cfg.loader == "packed"``, ``self.config.smear_gate == "bos"``,
  ``c.num_loops > 0``: an attribute of a value whose type is known to be the run's ``TrainConfig`` or
  ``GPTConfig``. Types come from annotations only: a parameter annotated with the class, an attribute of a class
  whose field is annotated with it (``Run.cfg: TrainConfig``) or assigned from such a parameter in a method
  (``self.config = config``), and plain assignments of those (``c = self.config``). A variable also assigned
  anything else is not typed. A class built only by one classmethod from a configuration parameter
  (``QuantSettings.from_train_config(cfg: TrainConfig)`` returning ``cls(prune_frac=cfg.quant_prune_frac, ...)``,
  and no other ``QuantSettings(...)`` anywhere) is a view of it: ``settings.prune_frac`` is decided, and pinned, as
  ``quant_prune_frac``. The modules that build configurations (``CONFIG_MODULES``: presets, parsing,
  validation) are left alone, since the configurations there are not yet the run's. Runtime settings (paths, run
  id, code bytes, seed) are never decided.
- **Constant parameters.** A module-level function parameter (every use of the function's name being a plain
  call) that no call in the packed sources passes and whose default is a constant, or that every call passes as
  the same constant (an undecorated function called at least once), is that constant: ``build_model(path,
  device=...)`` never asks for ``int6_matmul=True``, so the int6 kernel is not packed; ``_evaluate(..., sliding=
  False)`` is the only call left once ``if cfg.eval_stride:`` is decided, so sliding eval is not packed. Deciding
  drops calls, which can fix more parameters: the passes repeat until nothing changes.

Each decided test on a setting becomes a :class:`Pin`: a predicate the running program's configuration must still
satisfy (``eval_stride`` truthy, ``loader == "packed"``). The packed program checks its pins after reading the
environment and refuses a variable that would break one, naming it, instead of running code it does not have.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

TYPE_NAMES = {"TrainConfig": "train", "GPTConfig": "model"}
CONFIG_MODULES = frozenset({"pgolf.train.config", "pgolf.model.config", "pgolf.model.presets"})
PRESETS_MODULE, PRESET_CLASS = "pgolf.model.presets", "Preset"
NEVER_DECIDED = frozenset({"data_path", "tokenizer_path", "run_dir", "run_id", "code_bytes", "force", "seed", "preset"})
OPS = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
       ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not"}
APPLY = {"==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt,
         ">=": operator.ge, "in": lambda a, b: a in b, "not in": lambda a, b: a not in b,
         "is": operator.is_, "is not": operator.is_not, "truth": lambda a, b: bool(a)}
CONSTANT_TYPES = (bool, int, float, str, type(None))
MAX_PASSES = 4


@dataclass(frozen=True)
class Pin:
    """``op(<which config>.<field>, value) is outcome`` must hold when the packed program runs."""

    which: str     # "train" or "model"
    field: str
    op: str        # a key of APPLY
    value: Any
    outcome: bool

    def holds(self, train: Any, model: Any) -> bool:
        got = getattr(train if self.which == "train" else model, self.field)
        return bool(APPLY[self.op](_const(got), self.value)) is self.outcome


def specialize(trees: Mapping[str, ast.Module], train: Any, model: Any,
               called_from_outside: Iterable[tuple[str, str]] = ()) -> list[Pin]:
    """Decide the tests on ``train``/``model`` settings and on unpassed defaults in ``trees`` (edited in place);
    returns the pins, sorted. ``called_from_outside``: (module, function) pairs whose defaults stay (the entry)."""
    classes = class_attribute_types(trees)
    views = config_views(trees)
    outside = list(called_from_outside)
    if PRESETS_MODULE in trees and getattr(train, "preset", None):
        drop_other_presets(trees[PRESETS_MODULE], train.preset)
    configs = {"train": train, "model": model}
    undecided = set(NEVER_DECIDED)
    for name, tree in trees.items():
        if name not in CONFIG_MODULES:
            _changed_settings(tree, configs, undecided, {f for v in views.values() for f in v})
    pins: set[Pin] = set()
    fixed = _fixed_parameters(trees, outside)
    for _ in range(MAX_PASSES):
        for name, tree in trees.items():
            if name not in CONFIG_MODULES:
                _Folder(configs, classes, views, fixed.get(name, {}), pins, undecided).visit(tree)
        again = _fixed_parameters(trees, outside)
        if again == fixed:
            break
        fixed = again
    for name, tree in trees.items():
        if name not in CONFIG_MODULES:
            drop_unused_imports(tree)
            ast.fix_missing_locations(tree)
    return sorted(pins, key=lambda p: (p.which, p.field, p.op, repr(p.value), p.outcome))


def _fixed_parameters(trees: Mapping[str, ast.Module], outside: list[tuple[str, str]]):
    fixed = constant_parameters(trees)
    for module, fn in outside:
        fixed.get(module, {}).pop(fn, None)
    return fixed


def drop_unused_imports(tree: ast.Module) -> None:
    """Inside functions, drop the names of ``from m import a, b`` that the function (nested code included) no longer
    reads once its branches are decided, so that what they name is not packed for nothing. A statement keeps at
    least one name (it still imports ``m``, whatever that does), and module-level imports stay (they may be
    re-exports)."""
    for fn in ast.walk(tree):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        read = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        for node in _own_nodes(fn):
            if isinstance(node, ast.ImportFrom) and node.module != "__future__":
                used = [a for a in node.names if a.name == "*" or (a.asname or a.name) in read]
                if used and len(used) < len(node.names):
                    node.names = used


def drop_other_presets(tree: ast.Module, keep: str) -> None:
    """Drop the module-level statements that register a ``Preset("<name>", ...)`` other than ``keep`` (a preset
    whose name appears anywhere else in the module stays: something may look it up)."""
    def registered(stmt) -> str | None:
        if not isinstance(stmt, ast.Expr):
            return None
        names = {n.args[0].value for n in ast.walk(stmt) if isinstance(n, ast.Call) and _last(n.func) == PRESET_CLASS
                 and n.args and isinstance(n.args[0], ast.Constant) and isinstance(n.args[0].value, str)}
        return next(iter(names)) if len(names) == 1 else None

    named = [registered(s) for s in tree.body]
    mentions: dict[str, int] = {}
    for n in ast.walk(tree):
        if isinstance(n, ast.Constant) and isinstance(n.value, str):
            mentions[n.value] = mentions.get(n.value, 0) + 1
    tree.body = [s for s, name in zip(tree.body, named) if name is None or name == keep or mentions[name] > 1]


def _changed_settings(tree: ast.Module, configs: dict[str, Any], undecided: set[str], view_fields: set[str]) -> None:
    """Settings a module may change: ``replace(x, field=...)`` / ``x.replace(field=...)`` keywords and attribute
    assignments of config field names join ``undecided``; a module that builds a ``TrainConfig``/``GPTConfig``
    itself (not from an artifact's ``from_dict``) disables deciding on that kind."""
    fields = {f for c in configs.values() for f in vars(c)} | view_fields
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and _last(node.func) == "replace":
            undecided.update(k.arg for k in node.keywords if k.arg)
        elif isinstance(node, ast.Call) and _last(node.func) in TYPE_NAMES:
            configs.pop(TYPE_NAMES[_last(node.func)], None)
        for target, _ in _assignments(node):
            if isinstance(target, ast.Attribute) and target.attr in fields:
                undecided.add(target.attr)
        if isinstance(node, ast.Call) and _last(node.func) in ("setattr", "__setattr__"):
            undecided.update(a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str))


# ---- what is typed: class attributes, then each function's variables ------------------------------------------

def class_attribute_types(trees: Mapping[str, ast.Module]) -> dict[str, dict[str, str]]:
    """{class name: {attribute: type}}; a type is "train", "model" or a class name. Ambiguous entries dropped."""
    found: dict[str, dict[str, set]] = {}
    names = {n.name for t in trees.values() for n in t.body if isinstance(n, ast.ClassDef)}
    for tree in trees.values():
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
            attrs = found.setdefault(cls.name, {})
            for s in cls.body:
                if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name):
                    attrs.setdefault(s.target.id, set()).add(_annotation_type(s.annotation, names))
                elif isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)) and s.args.args:
                    env = _param_types(s, names, {}, cls.name)
                    for node in ast.walk(s):
                        for target, value in _assignments(node):
                            if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) \
                                    and target.value.id == s.args.args[0].arg:
                                attrs.setdefault(target.attr, set()).add(_expr_type(value, env, {}))
    return {c: {a: next(iter(t)) for a, t in attrs.items() if len(t) == 1 and None not in t}
            for c, attrs in found.items() if sum(1 for t in trees.values() for n in t.body
                                                 if isinstance(n, ast.ClassDef) and n.name == c) == 1}


def _annotation_type(node: ast.expr | None, classes: set[str]) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        name = node.value
    elif isinstance(node, ast.Name):
        name = node.id
    elif isinstance(node, ast.Attribute):
        name = node.attr
    else:
        return None
    return TYPE_NAMES.get(name) or (name if name in classes else None)


def _param_types(fn, classes: set[str], outer: dict[str, str], cls: str | None) -> dict[str, str]:
    env = dict(outer)
    a = fn.args
    params = [*a.posonlyargs, *a.args, *a.kwonlyargs]
    for p in params:
        env.pop(p.arg, None)
        t = _annotation_type(p.annotation, classes)
        if t:
            env[p.arg] = t
    if cls and params and not any(_last(d) in ("staticmethod", "classmethod") for d in fn.decorator_list):
        env[params[0].arg] = cls
    return env


def _assignments(node: ast.AST):
    """(target, value) pairs a statement assigns, tuples split when both sides are tuples of the same length."""
    pairs = []
    if isinstance(node, ast.Assign):
        pairs = [(t, node.value) for t in node.targets]
    elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and getattr(node, "value", None):
        pairs = [(node.target, node.value)] if not isinstance(node, ast.AugAssign) else [(node.target, None)]
    out = []
    for t, v in pairs:
        if isinstance(t, (ast.Tuple, ast.List)):
            vs = v.elts if isinstance(v, (ast.Tuple, ast.List)) and len(v.elts) == len(t.elts) else [None] * len(t.elts)
            out += list(zip(t.elts, vs))
        else:
            out.append((t, v))
    return out


def _expr_type(node: ast.expr | None, env: Mapping[str, str], classes: Mapping[str, dict[str, str]]) -> str | None:
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Attribute):
        owner = _expr_type(node.value, env, classes)
        return classes.get(owner, {}).get(node.attr) if owner else None
    return None


def _local_types(fn, classes: Mapping[str, dict[str, str]], env: dict[str, str]) -> dict[str, str]:
    """The function's variables of known type: typed parameters and variables only ever assigned typed values."""
    seen: dict[str, set] = {}
    for node in _own_nodes(fn):
        for target, value in _assignments(node):
            for n in ast.walk(target):
                if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    seen.setdefault(n.id, set()).add(_expr_type(value, env, classes) if n is target else None)
        bound = [node.target] if isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)) else \
            [i.optional_vars for i in node.items if i.optional_vars] if isinstance(node, (ast.With, ast.AsyncWith)) \
            else []
        for n in (n for b in bound for n in ast.walk(b)):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                seen.setdefault(n.id, set()).add(None)
        if isinstance(node, ast.ExceptHandler) and node.name:
            seen.setdefault(node.name, set()).add(None)
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                seen.setdefault(a.asname or a.name.split(".")[0], set()).add(None)
        if isinstance(node, (ast.Global, ast.Nonlocal)):
            for n in node.names:
                seen.setdefault(n, set()).add(None)
    out = dict(env)
    for name, types in seen.items():
        params = {p.arg for p in [*fn.args.posonlyargs, *fn.args.args, *fn.args.kwonlyargs]}
        typed = types | ({env[name]} if name in params and name in env else set())
        if len(typed) == 1 and None not in typed:
            out[name] = next(iter(typed))
        else:
            out.pop(name, None)
    return out


def _own_nodes(fn):
    """Nodes of ``fn``'s body, not descending into nested functions, lambdas or classes."""
    todo = list(fn.body)
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
                todo.append(child)


def config_views(trees: Mapping[str, ast.Module]) -> dict[str, dict[str, tuple[str, str]]]:
    """{class: {field: (config kind, config field)}} for the classes whose only construction in ``trees`` is one
    classmethod ``def m(cls, cfg: TrainConfig)`` (or ``GPTConfig``) that returns ``cls(field=cfg.x, ...)``, and that
    no class in ``trees`` subclasses: an instance's ``field`` is the configuration's ``x`` (fields given anything
    else are not mapped)."""
    classes = [c for t in trees.values() for c in t.body if isinstance(c, ast.ClassDef)]
    names = [c.name for c in classes]
    built = {_last(n.func) for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.Call)}
    based = {_last(b) for c in classes for b in c.bases}
    out = {}
    for cls in classes:
        makers = [m for m in cls.body if isinstance(m, ast.FunctionDef) and _maker(m)]
        if names.count(cls.name) != 1 or len(makers) != 1 or cls.name in built | based:
            continue
        clsarg, (param, kind), ret = _maker(makers[0])
        others = [n for m in cls.body if isinstance(m, ast.FunctionDef) and m is not makers[0]
                  for n in ast.walk(m) if isinstance(n, ast.Call) and _last(n.func) in (clsarg, "type")]
        if others:
            continue
        out[cls.name] = {k.arg: (kind, k.value.attr) for k in ret.keywords
                         if k.arg and isinstance(k.value, ast.Attribute) and isinstance(k.value.value, ast.Name)
                         and k.value.value.id == param}
    return out


def _maker(fn: ast.FunctionDef):
    """(cls parameter, (config parameter, kind), the returned ``cls(...)`` call) of a classmethod whose whole body
    (after its docstring) may compute locals and then returns ``cls(...)`` with keywords only; else None."""
    args = fn.args
    if not any(_last(d) == "classmethod" for d in fn.decorator_list) or len(args.args) != 2 or args.vararg \
            or args.kwarg or args.kwonlyargs or args.posonlyargs:
        return None
    kind = _annotation_type(args.args[1].annotation, set())
    ret = fn.body[-1]
    if kind is None or not isinstance(ret, ast.Return) or not isinstance(ret.value, ast.Call) or \
            not isinstance(ret.value.func, ast.Name) or ret.value.func.id != args.args[0].arg or ret.value.args:
        return None
    returns = [n for n in ast.walk(fn) if isinstance(n, ast.Return)]
    return (args.args[0].arg, (args.args[1].arg, kind), ret.value) if len(returns) == 1 else None


# ---- constant parameters ---------------------------------------------------------------------------------------

def constant_parameters(trees: Mapping[str, ast.Module]) -> dict[str, dict[str, dict[str, Any]]]:
    """{module: {function: {parameter: value}}} for module-level functions whose every use in ``trees`` is a
    plain call: parameters the function never assigns that no call passes and whose default is a constant, or that
    every call passes as the same constant (an undecorated function with at least one call, whose name is no string
    in the sources: ``getattr(module, name)`` may call it with anything)."""
    uses: dict[str, list] = {}
    strings = {n.value for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.Constant)
               and isinstance(n.value, str)}
    for tree in trees.values():
        calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
        for n in ast.walk(tree):
            name = n.id if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load) else \
                n.attr if isinstance(n, ast.Attribute) else None
            if name is not None:
                uses.setdefault(name, []).append(n if id(n) in calls else None)
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    if a.asname:
                        uses.setdefault(a.name.split(".")[-1], []).append(None)
    call_of = {id(n.func): n for t in trees.values() for n in ast.walk(t) if isinstance(n, ast.Call)}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for mod, tree in trees.items():
        for fn in (s for s in tree.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))):
            sites = uses.get(fn.name, [])
            if any(s is None for s in sites):
                continue
            calls = [call_of[id(s)] for s in sites]
            if any(isinstance(a, ast.Starred) for c in calls for a in c.args) or \
                    any(k.arg is None for c in calls for k in c.keywords):
                continue
            fixed = _fixed(fn, calls, passed_ok=not fn.decorator_list and fn.name not in strings)
            if fixed:
                out.setdefault(mod, {})[fn.name] = fixed
    return out


def _fixed(fn, calls: list[ast.Call], passed_ok: bool) -> dict[str, Any]:
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    defaults = dict(zip([p.arg for p in positional[len(positional) - len(a.defaults):]], a.defaults))
    defaults.update({p.arg: d for p, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None})
    index = {p.arg: i for i, p in enumerate(positional)}
    assigned = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    out = {}
    for name in [*index, *(p.arg for p in a.kwonlyargs)]:
        if name in assigned:
            continue
        given = [_passed(c, name, index.get(name)) for c in calls]
        if any(g is not None for g in given) and not passed_ok:
            continue
        values = [g if g is not None else defaults.get(name) for g in given] or [defaults.get(name)]
        if all(isinstance(v, ast.Constant) for v in values) and \
                len({(type(v.value), repr(v.value)) for v in values}) == 1:
            out[name] = values[0].value
    return out


def _passed(call: ast.Call, name: str, position: int | None) -> ast.expr | None:
    """What ``call`` passes for the parameter ``name`` (at ``position``, if positional), or None."""
    for k in call.keywords:
        if k.arg == name:
            return k.value
    return call.args[position] if position is not None and len(call.args) > position else None


# ---- deciding tests --------------------------------------------------------------------------------------------

class _Folder(ast.NodeTransformer):
    """Decides tests inside functions (and methods), with each function's typed variables."""

    def __init__(self, configs: dict[str, Any], classes: dict[str, dict[str, str]],
                 views: dict[str, dict[str, tuple[str, str]]], defaults: dict[str, dict[str, Any]], pins: set[Pin],
                 undecided: set[str]):
        self.configs, self.classes, self.defaults, self.pins = configs, classes, defaults, pins
        self.views = views
        self.undecided = undecided
        self.class_names = set(classes)
        self.env: dict[str, str] = {}
        self.consts: dict[str, Any] = {}
        self.cls: str | None = None
        self.depth = 0

    def visit_ClassDef(self, node):
        outer, self.cls = self.cls, node.name
        self.generic_visit(node)
        self.cls = outer
        return node

    def visit_FunctionDef(self, node):
        for d in node.decorator_list + node.args.defaults + [d for d in node.args.kw_defaults if d]:
            self.visit(d)
        saved = self.env, self.consts, self.cls
        env = _param_types(node, self.class_names, self.env, self.cls)
        self.env = _local_types(node, self.classes, env)
        own = {p.arg for p in [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]}
        self.consts = {k: v for k, v in self.consts.items() if k not in own}
        if self.depth == 0 and self.cls is None:
            self.consts.update(self.defaults.get(node.name, {}))
        self.cls = None
        self.depth += 1
        node.body = self.block(node.body) or [ast.Pass()]
        self.depth -= 1
        self.env, self.consts, self.cls = saved
        return node

    visit_AsyncFunctionDef = visit_FunctionDef

    def block(self, stmts: list[ast.stmt]) -> list[ast.stmt]:
        """The statements with decided ``if``s inlined and what follows a return/raise/continue/break dropped."""
        out: list[ast.stmt] = []
        for s in stmts:
            r = self.visit(s)
            for t in r if isinstance(r, list) else [r] if r is not None else []:
                out.append(t)
                if isinstance(t, (ast.Return, ast.Raise, ast.Continue, ast.Break)):
                    return out
        return out

    def generic_visit(self, node):
        for field, value in ast.iter_fields(node):
            if isinstance(value, list) and value and all(isinstance(v, ast.stmt) for v in value):
                kept = self.block(value)
                setattr(node, field, kept or ([ast.Pass()] if field == "body" else []))
            elif isinstance(value, list):
                new = []
                for v in value:
                    if not isinstance(v, ast.AST):  # e.g. the None key of a ``**mapping`` entry in a dict display
                        new.append(v)
                        continue
                    r = self.visit(v)
                    new.extend(r if isinstance(r, list) else [] if r is None else [r])
                setattr(node, field, new)
            elif isinstance(value, ast.AST):
                setattr(node, field, self.visit(value))
        return node

    def visit_If(self, node):
        decided = self.decide(node.test)
        if decided is None or self.depth == 0:
            return self.generic_visit(node)
        return self.block(node.body if decided else node.orelse) or ([ast.Pass()] if decided else [])

    def visit_IfExp(self, node):
        decided = self.decide(node.test) if self.depth else None
        if decided is None:
            return self.generic_visit(node)
        return self.visit(node.body if decided else node.orelse)

    # ---- evaluating a test

    def decide(self, test: ast.expr) -> bool | None:
        """The test's truth when it depends only on settings and constants (its pins recorded), else None."""
        pins: list[Pin] = []
        value = self.truth(test, pins)
        if value is None:
            return None
        self.pins.update(pins)
        return value

    def truth(self, node: ast.expr, pins: list[Pin]) -> bool | None:
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            v = self.truth(node.operand, pins)
            return None if v is None else not v
        if isinstance(node, ast.BoolOp):
            vals = [self.truth(v, pins) for v in node.values]
            if isinstance(node.op, ast.And):
                return False if False in vals else (True if all(v is True for v in vals) else None)
            return True if True in vals else (False if all(v is False for v in vals) else None)
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            return self.compare(node.left, OPS.get(type(node.ops[0])), node.comparators[0], pins)
        known = self.value(node)
        if known is None:
            return None
        v, setting = known
        if setting:
            pins.append(Pin(setting[0], setting[1], "truth", None, bool(v)))
        return bool(v)

    def compare(self, left, op: str | None, right, pins: list[Pin]) -> bool | None:
        a, b = self.value(left), self.value(right)
        if op is None or a is None or b is None or (a[1] and b[1]):
            return None
        if b[1] and op not in ("==", "!=", "is", "is not"):
            return None
        (va, sa), (vb, sb) = (a, b) if not b[1] else (b, a)
        try:
            outcome = bool(APPLY[op](va, vb))
        except TypeError:
            return None
        if sa:
            pins.append(Pin(sa[0], sa[1], op, vb, outcome))
        return outcome

    def value(self, node) -> tuple[Any, tuple[str, str] | None] | None:
        """(constant, (config, field) it was read from or None), or None when not known at pack time."""
        if isinstance(node, ast.Constant):
            return node.value, None
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)) and \
                all(isinstance(e, ast.Constant) for e in node.elts):
            return tuple(e.value for e in node.elts), None
        if isinstance(node, ast.Name) and node.id in self.consts and self.env.get(node.id) is None:
            return self.consts[node.id], None
        if isinstance(node, ast.Attribute) and node.attr not in self.undecided:
            owner = _expr_type(node.value, self.env, self.classes)
            which, field = (owner, node.attr) if owner in self.configs else \
                self.views.get(owner or "", {}).get(node.attr, (None, None))
            if which in self.configs and field not in self.undecided:
                v = _const(getattr(self.configs[which], field, _MISSING))
                if v is not _MISSING:
                    return v, (which, field)
        return None


_MISSING = object()


def _const(v: Any) -> Any:
    """``v`` as a constant the tests may compare (tuples of constants included), else _MISSING."""
    if isinstance(v, CONSTANT_TYPES):
        return v
    if isinstance(v, (tuple, list)) and all(isinstance(e, CONSTANT_TYPES) for e in v):
        return tuple(v)
    return _MISSING


def _last(node: ast.expr) -> str:
    if isinstance(node, ast.Call):
        node = node.func
    return node.attr if isinstance(node, ast.Attribute) else node.id if isinstance(node, ast.Name) else ""


__all__ = ["specialize", "Pin", "CONFIG_MODULES", "class_attribute_types", "config_views", "constant_parameters",
           "drop_unused_imports"]
