"""The public API is typed (issue 34): every public function and method of `miniai/` names the type of each parameter
and of its return, so `py.typed` tells the truth and the type check (`make typecheck`) sees every call into the
library. Read from the source with `ast` (nothing is imported), so the rule holds as the code grows.

Public means: a module whose dotted path has no part with a leading underscore (`miniai/_moved.py` is out), a
function or class at its top level without one, and a public class's methods without one, plus `__init__` and
`__call__`, which are the signatures a user calls. Functions nested inside functions are the enclosing one's business.
`self` and `cls` (the first parameter of a method that is not a staticmethod) need no annotation."""
import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / 'miniai'
CALLED = ('__init__', '__call__')  # dunders that are part of a class's public signature


def public_modules() -> list[Path]:
    "Every module of the package whose path has no part with a leading underscore (`__init__.py` counts as public)."
    return [p for p in sorted(PKG.rglob('*.py'))
            if not any(part.startswith('_') and part != '__init__.py' for part in p.relative_to(PKG.parent).parts)]


def is_public(name: str, method: bool = False) -> bool:
    return not name.startswith('_') or (method and name in CALLED)


def missing(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    "What `fn` leaves unannotated: each parameter's name, and 'return'."
    a = fn.args
    params = a.posonlyargs + a.args
    static = any(isinstance(d, ast.Name) and d.id == 'staticmethod' for d in fn.decorator_list)
    if method and not static and params: params = params[1:]  # self / cls
    params = params + ([a.vararg] if a.vararg else []) + a.kwonlyargs + ([a.kwarg] if a.kwarg else [])
    res = [p.arg for p in params if p.annotation is None]
    return res + (['return'] if fn.returns is None else [])


def unannotated(path: Path, root: Path = PKG.parent) -> list[str]:
    "'module:line qualname (what is missing)' for each public function or method of the module at `path` lacking one."
    rel, res = path.relative_to(root), []

    def check(fn, qualname, method):
        if gaps := missing(fn, method): res.append(f'{rel}:{fn.lineno} {qualname} ({", ".join(gaps)})')

    def walk_class(cls: ast.ClassDef, prefix: str):
        for node in cls.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_public(node.name, method=True):
                check(node, f'{prefix}.{node.name}', method=True)
            elif isinstance(node, ast.ClassDef) and is_public(node.name):
                walk_class(node, f'{prefix}.{node.name}')

    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and is_public(node.name):
            check(node, node.name, method=False)
        elif isinstance(node, ast.ClassDef) and is_public(node.name):
            walk_class(node, node.name)
    return res


def test_every_public_function_and_method_is_annotated():
    modules = public_modules()
    assert PKG / 'core' / 'learner.py' in modules and len(modules) > 70, 'the walk missed the package'
    gaps = [g for p in modules for g in unannotated(p)]
    assert not gaps, f'{len(gaps)} public functions or methods lack annotations:\n' + '\n'.join(gaps)


def test_the_package_says_it_is_typed():
    assert (PKG / 'py.typed').is_file()


@pytest.mark.parametrize('src, gaps', [
    ('def f(x, y: int): pass', ['f (x, return)']),
    ('def f(x: int, *a, k=1, **kw) -> None: pass', ['f (a, k, kw)']),
    ('def _f(x): pass', []),
    ('class A:\n  def m(self, x) -> int: pass\n  def _p(self, x): pass\n  def __init__(self, n): pass',
     ['A.m (x)', 'A.__init__ (n, return)']),
    ('class A:\n  @staticmethod\n  def s(x) -> None: pass\n  @classmethod\n  def c(cls) -> None: pass', ['A.s (x)']),
    ('class _A:\n  def m(self, x): pass', []),
    ('def f() -> None:\n  def inner(x): pass', []),
])
def test_the_check_finds_what_is_missing(tmp_path, src, gaps):
    # the rule itself, on small sources: a check that could not fail would prove nothing
    fake = tmp_path / 'x.py'
    fake.write_text(src)
    assert [g.split(' ', 1)[1] for g in unannotated(fake, tmp_path)] == gaps
