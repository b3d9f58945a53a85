"""What a packed run keeps: the specializer decides what the configuration fixed, the reach keeps what is named."""

from __future__ import annotations

import ast
import textwrap

import pytest

from pgolf.quant.reach import ReachError, compact, minify_tree, reachable_sources
from pgolf.quant.specialize import Pin, specialize

CONFIG_USER = textwrap.dedent('''
    from __future__ import annotations
    from dataclasses import dataclass
    from pgolf.train.config import TrainConfig

    @dataclass
    class Run:
        cfg: TrainConfig

    def f(run: Run, x):
        cfg = run.cfg
        if cfg.eval_stride:
            a = 1
        else:
            a = 2
        if cfg.loader == "packed" and x:
            return 3
        b = 5 if cfg.quant_method == "none" else 6
        return a * 10 + b

    def g(cfg: TrainConfig):
        cfg = fresh()
        return 1 if cfg.eval_stride else 2

    def fresh():
        return None

    def h(path, *, fancy=False):
        if fancy:
            return "fancy"
        return "plain"

    def k(path, *, fancy=False):
        if fancy:
            return "fancy"
        return "plain"

    def uses():
        return h("p"), k("q"), k("r", fancy=True)
''')


def _config(**flags):
    from pgolf.train.config import resolve

    return resolve("tiny", env={}, flags=flags)


def _specialized(src: str, **flags):
    t, m = _config(**flags)
    trees = {"pgolf.user": ast.parse(src)}
    pins = specialize(trees, t, m)
    return ast.unparse(trees["pgolf.user"]), pins, t, m


def test_tests_on_the_runs_settings_are_decided_and_pinned_and_behave_as_before():
    src, pins, t, m = _specialized(CONFIG_USER, eval_stride=64, loader="packed", quant_method="gptq")
    assert "a = 2" not in src and "b = 6" in src and "b = 5" not in src  # decided both ways
    assert "if cfg.loader == 'packed' and x:" in src  # a test that also reads x stays
    assert "return 1 if cfg.eval_stride else 2" in src  # g reassigns cfg: not typed, not decided
    fns = {n.name: ast.unparse(n) for n in ast.parse(src).body if isinstance(n, ast.FunctionDef)}
    assert "fancy" not in fns["h"].split(":", 1)[1]  # no call passes fancy: h is plain only
    assert "return 'fancy'" in fns["k"]  # one call passes it: stays
    assert Pin("train", "eval_stride", "truth", None, True) in pins
    assert Pin("train", "quant_method", "==", "none", False) in pins
    assert all(p.holds(t, m) for p in pins)
    original, specialized = {}, {}
    exec(CONFIG_USER.replace("from pgolf.train.config import TrainConfig", ""), original)
    exec(src.replace("from pgolf.train.config import TrainConfig", ""), specialized)
    for x in (0, 1):
        run = original["Run"](t)
        assert specialized["f"](specialized["Run"](t), x) == original["f"](run, x)
    assert specialized["uses"]() == original["uses"]()
    other = _config(eval_stride=0, loader="packed", quant_method="gptq")
    assert not all(p.holds(*other) for p in pins)


def test_a_setting_the_sources_change_is_never_decided():
    src = CONFIG_USER + "\ndef tweak(cfg: TrainConfig):\n    return replace(cfg, eval_stride=0)\n"
    out, pins, _, _ = _specialized(src, eval_stride=64)
    assert "if cfg.eval_stride:" in out and not any(p.field == "eval_stride" for p in pins)


PASSING = textwrap.dedent('''
    from __future__ import annotations
    from pgolf.train.config import TrainConfig

    def ev(x, *, sliding):
        if sliding:
            return "slide"
        return "plain"

    def named(flag):
        return "on" if flag else "off"

    @tag
    def deco(flag):
        return "on" if flag else "off"

    def run(cfg: TrainConfig):
        from pgolf.b import helper, used
        out = [ev(1, sliding=False), named(False), deco(False), used()]
        if cfg.eval_stride:
            out.append(ev(2, sliding=True))
            out.append(helper())
        return out, globals()["named"](True)
''')


def test_a_parameter_every_remaining_call_passes_as_one_constant_is_decided():
    """Deciding ``if cfg.eval_stride`` drops the only call passing sliding=True: a second pass fixes ``sliding``;
    the import of what only that branch used goes too. A function named by a string (getattr/globals) or one with
    a decorator keeps its branches."""
    off, pins, t, _ = _specialized(PASSING, eval_stride=0)
    on, _, _, _ = _specialized(PASSING, eval_stride=64)
    fns = {n.name: ast.unparse(n) for n in ast.parse(off).body if isinstance(n, ast.FunctionDef)}
    assert "slide" not in fns["ev"] and "from pgolf.b import used" in fns["run"] and "helper" not in fns["run"]
    assert "'on' if flag else 'off'" in fns["named"] and "'on' if flag else 'off'" in fns["deco"]
    assert Pin("train", "eval_stride", "truth", None, False) in pins
    assert "slide" in on and "import helper, used" in on


VIEW = textwrap.dedent('''
    from __future__ import annotations
    from dataclasses import dataclass
    from pgolf.train.config import TrainConfig

    @dataclass
    class Knobs:
        frac: float = 0.0
        top: int = 3

        @classmethod
        def of(cls, cfg: TrainConfig):
            top = cfg.lqer_top + 1
            return cls(frac=cfg.quant_prune_frac, top=top)

    def prune(k: Knobs):
        if k.frac:
            return "pruned"
        return "kept" if k.top > 2 else "few"

    def run(cfg: TrainConfig):
        return prune(Knobs.of(cfg))
''')


@pytest.mark.parametrize("extra,decided", [
    ("", True),
    ("\ndef other():\n    return Knobs(frac=0.5)\n", False),             # built elsewhere: not a view
    ("\nclass More(Knobs):\n    pass\n", False),                         # a subclass may hold anything
    ("\ndef tweak(k: Knobs):\n    return replace(k, frac=0.5)\n", False),  # a copy with another frac
    ("\ndef poke(k: Knobs):\n    k.frac = 0.5\n", False),                  # changed in place
    ("@classmethod\n    def half(cls):\n        return cls(frac=0.5)\n", False),  # another maker inside
])
def test_a_class_built_only_from_the_config_is_decided_as_the_config(extra, decided):
    """``Knobs.of(cfg)`` copies ``quant_prune_frac`` into ``frac``: ``k.frac`` is that setting (``top`` is computed, so
    it is not); anything that could give a Knobs another ``frac`` keeps the test."""
    src = VIEW.replace("@classmethod\n", extra + "\n    @classmethod\n") if extra.startswith("@") else VIEW + extra
    out, pins, t, m = _specialized(src, quant_prune_frac=0.0)
    fn = next(ast.unparse(n) for n in ast.parse(out).body if isinstance(n, ast.FunctionDef) and n.name == "prune")
    assert ("pruned" not in fn) is decided and "k.top > 2" in fn
    assert (Pin("train", "quant_prune_frac", "truth", None, False) in pins) is decided
    assert not any(p.field == "lqer_top" for p in pins) and all(p.holds(t, m) for p in pins)


PKG = {
    "pgolf": "",
    "pgolf.a": textwrap.dedent('''
        import torch
        from pgolf.b import used, Base
        from pgolf import b as bmod

        def main():
            return used() + Thing().run() + bmod.via_module() + torch.ops.pgolf.myop(1)

        def unused():
            return 1

        class Thing(Base):
            def run(self):
                return self.helper()

            def helper(self):
                return 2

            def never(self):
                return 3

            def __repr__(self):
                return "T"

        @torch.library.custom_op("pgolf::myop", mutates_args=())
        def myop(x: torch.Tensor) -> torch.Tensor:
            return x

        @myop.register_fake
        def _(x):
            return x

        @torch.library.custom_op("pgolf::other", mutates_args=())
        def other(x: torch.Tensor) -> torch.Tensor:
            return x

        @other.register_fake
        def _(x):
            return x
    '''),
    "pgolf.b": textwrap.dedent('''
        """doc"""
        TABLE = {"x": 1}

        def used():
            """its doc"""
            return TABLE["x"]

        def via_module():
            return 0

        def unused_b():
            return 1

        class Base:
            def shared(self):
                return 0
    '''),
}


def _source(pkg: dict[str, str]):
    return lambda name: (ast.parse(pkg[name]), name == "pgolf") if name in pkg else None


def _names(src: str) -> set[str]:
    return {n.name for n in ast.walk(ast.parse(src)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}


def test_only_what_the_entry_names_is_kept_and_the_result_runs():
    out = reachable_sources([("pgolf.a", "main")], _source(PKG))
    a, b = _names(out["pgolf.a"][1]), _names(out["pgolf.b"][1])
    assert {"main", "Thing", "run", "helper", "__repr__", "myop", "_"} <= a
    assert not {"unused", "never", "other"} & a  # the custom op nobody calls goes with its fake
    assert b == {"used", "via_module", "Base"} and "doc" not in out["pgolf.b"][1]
    assert "shared" not in out["pgolf.b"][1]


def test_a_module_used_as_a_value_is_kept_whole_and_an_unknown_name_is_an_error():
    pkg = dict(PKG, **{"pgolf.a": "from pgolf import b\ndef main(n):\n    return getattr(b, n)()\n"})
    out = reachable_sources([("pgolf.a", "main")], _source(pkg))
    assert {"used", "via_module", "unused_b", "Base", "shared"} <= _names(out["pgolf.b"][1])
    bad = dict(PKG, **{"pgolf.a": "from pgolf.b import missing\ndef main():\n    return missing()\n"})
    with pytest.raises(ReachError, match="missing"):
        reachable_sources([("pgolf.a", "main")], _source(bad))


def test_compact_source_parses_to_the_same_tree_and_is_smaller():
    from pgolf.quant.bundle import _path, module_closure

    for name in module_closure():
        src = ast.unparse(minify_tree(ast.parse(_path(name)[0].read_text())))
        small = compact(src)
        assert ast.dump(ast.parse(small)) == ast.dump(ast.parse(src)), name
        assert len(small) < len(src) or len(src) < 40, name
    doc = ast.unparse(ast.parse('def f():\n    """two\n    lines"""\n    return 1\n'))
    assert compact(doc) == doc  # a string over two lines: left as it was


def _undefined_globals(src: str, name: str) -> set[str]:
    """Global names a module reads that nothing in it binds and that are not builtins (annotations, which are never
    evaluated here, do not count: symtable skips them under ``from __future__ import annotations``)."""
    import builtins
    import symtable

    top = symtable.symtable(src, name, "exec")
    bound = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported() or s.is_namespace()}
    used: set[str] = set()

    def walk(t) -> None:
        for s in t.get_symbols():
            if s.is_referenced() and (s.is_global() or t.get_type() == "module"):
                used.add(s.get_name())
            if s.is_declared_global() and s.is_assigned():
                bound.add(s.get_name())
        for child in t.get_children():
            walk(child)

    walk(top)
    return used - bound - set(dir(builtins)) - {"__file__", "__name__", "__doc__", "__spec__", "__path__"}


@pytest.mark.parametrize("preset,device", [("sota", "auto"), ("tiny", "cpu"), ("pr1493", "auto")])
def test_every_name_a_packed_module_reads_is_still_defined(preset, device):
    from pgolf.quant import bundle
    from pgolf.train.config import resolve

    t, m = resolve(preset, env={}, flags=dict(device=device))
    pk = bundle.packed(t.to_dict(), m.to_dict())
    missing = {name: _undefined_globals(src, name) for name, (_, src) in pk.modules.items()}
    assert not {k: v for k, v in missing.items() if v}
    # the check itself sees a dropped definition
    assert _undefined_globals("def f():\n    return g()\n", "x") == {"g"}
