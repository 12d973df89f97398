"""The one-house layout (ARCHITECTURE.md): the course's module names in front, rooms by concern behind them, imports
going one way. Read from the source: the import graph of miniai/, the size of each module, what the fronts say, and
which mechanisms live where."""
import ast
import re
from pathlib import Path

import pytest

import miniai
from miniai.core.learner import Learner

PKG = Path(miniai.__file__).parent
#: the rooms, lowest first: a room imports only from rooms before it (and itself)
ROOMS = ('core', 'data', 'callbacks', 'models', 'engines', 'runs', 'tools', 'app')
FRONTS = ('learner', 'datasets', 'conv', 'activations', 'init', 'sgd', 'resnet', 'augment', 'accel', 'training', 'fid',
          'diffusion', 'imports')
LEVEL = {'_moved': -1, **{r: i for i, r in enumerate(ROOMS)}}  # _moved: the old names' table, imports nothing of ours


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob('*.py'))}


def type_only_imports(tree: ast.Module) -> set[ast.AST]:
    "The import statements under `if TYPE_CHECKING:`: read by the type checker, never run."
    return {n for node in ast.walk(tree) if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
            and node.test.id == 'TYPE_CHECKING' for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))}


def imports_of(name: str, type_only: bool = True) -> list[tuple[str, list[str], int]]:
    """Every miniai module `name` imports (at the top or inside a function), the names it takes, and the line;
    with `type_only=False`, without those under `if TYPE_CHECKING:` (those that run: what an import at run time costs)."""
    path, res = MODULES[name], []
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    tree = ast.parse(path.read_text())
    skip = set() if type_only else type_only_imports(tree)
    for node in ast.walk(tree):
        if node in skip: continue
        if isinstance(node, ast.Import):
            res += [(a.name, [], node.lineno) for a in node.names if a.name.startswith('miniai')]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')
                base = base[:len(base) - node.level + 1]
                target = '.'.join(base + ([node.module] if node.module else []))
            else: target = node.module or ''
            if not target.startswith('miniai'): continue
            names = [a.name for a in node.names]
            subs = [f'{target}.{n}' for n in names if f'{target}.{n}' in MODULES]  # `from . import x`: module x
            res += [(s, [], node.lineno) for s in subs]
            rest = [n for n in names if f'{target}.{n}' not in MODULES]
            if rest or not subs: res.append((target, rest, node.lineno))
    return res


def room_of(name: str) -> str | None:
    "The room of a module (`miniai.core.learner` -> 'core'), '_moved', or None for a front or the package itself."
    parts = name.split('.')
    if len(parts) >= 2 and parts[1] in LEVEL: return parts[1]
    return None


#: what each module imports when it runs; TYPED_GRAPH adds the imports for annotations only (`if TYPE_CHECKING:`)
GRAPH = {name: sorted({t for t, _, _ in imports_of(name, type_only=False) if t in MODULES and t != name})
         for name in MODULES}
TYPED_GRAPH = {name: sorted({t for t, _, _ in imports_of(name) if t in MODULES and t != name}) for name in MODULES}


def test_the_rooms_and_fronts_are_all_there():
    assert {room_of(n) for n in MODULES} - {None} == set(LEVEL)
    assert all(f'miniai.{f}' in MODULES and room_of(f'miniai.{f}') is None for f in FRONTS)
    tops = {n for n in MODULES if n.count('.') == 1 and room_of(n) is None}
    assert tops == {f'miniai.{f}' for f in FRONTS} | {'miniai.__main__'}, 'beside the fronts, only rooms at the top'


def test_the_import_graph_has_no_cycle():
    """Imports inside functions count too: a lazy import that closes a loop is still a loop; so do imports for
    annotations only (`if TYPE_CHECKING:`), which a reader, a type checker and a layout check all follow."""
    seen, done, path = set(), set(), []

    def visit(n):
        seen.add(n)
        path.append(n)
        for m in TYPED_GRAPH[n]:
            if m in path: pytest.fail('import cycle: ' + ' -> '.join(path[path.index(m):] + [m]))
            if m not in seen: visit(m)
        path.pop()
        done.add(n)
    for n in TYPED_GRAPH:
        if n not in seen: visit(n)
    assert done == set(TYPED_GRAPH)


def test_a_checker_that_would_see_a_cycle():
    "The two checks above read the graph right: the old data <-> datasets loop is what they would have reported."
    edges = [(a, b) for a in GRAPH for b in GRAPH[a]]
    assert ('miniai.data.dataloaders', 'miniai.data.folders') in edges  # DataLoaders brings the sources together
    assert ('miniai.data.folders', 'miniai.data.dataloaders') not in edges  # and no source builds loaders
    assert ('miniai.runs.checkpoint', 'miniai.engines.cluster') in edges  # a function-level or top import, either way
    # the Learner imports the events and the checks; they name it (`AnyLearner`) without importing it, even for types
    assert 'miniai.core.events' in GRAPH['miniai.core.learner']
    assert 'miniai.core.learner' not in TYPED_GRAPH['miniai.core.events'] + TYPED_GRAPH['miniai.core.checks']


def test_imports_go_down_from_room_to_room():
    up = [f'{a} imports {b}' for a in TYPED_GRAPH for b in TYPED_GRAPH[a]
          if room_of(a) is not None and (room_of(b) is None or LEVEL[room_of(b)] > LEVEL[room_of(a)])]
    assert not up, 'a room imports a room above it (or a front): ' + '; '.join(up)


def test_no_module_takes_a_private_name_from_another():
    taken = [f'{name}:{line} takes {n} from {target}' for name in MODULES for target, names, line in imports_of(name)
             for n in names if n.startswith('_') and not n.startswith('__') and target != name]
    assert not taken, taken


def test_modules_stay_small():
    big = {n: len(p.read_text().splitlines()) for n, p in MODULES.items() if len(p.read_text().splitlines()) > 310}
    assert not big, f'modules over ~300 lines: {big}'


@pytest.mark.parametrize('front', FRONTS)
def test_each_course_front_says_it_is_one(front):
    doc = ast.get_docstring(ast.parse(MODULES[f'miniai.{front}'].read_text())) or ''
    assert 'A front' in ' '.join(doc.split('\n\n')[0].split()), 'the first paragraph says it is a front'


def test_learner_methods_added_elsewhere_are_listed_in_its_docstring():
    added = sorted(n for n, f in vars(Learner).items() if callable(f) and getattr(f, '__module__', '') != Learner.__module__)
    assert {'lr_find', 'summary', 'save', 'load', 'resume_cb', 'get_preds', 'predict_item', 'capture_preds',
            'show_image_batch', 'export'} <= set(added)
    assert [n for n in added if f'`{n}`' not in Learner.__doc__] == []


#: (a pattern of one job's mechanism, the only files where it may appear): one mechanism per job
ONE_PLACE = [
    (r'os\.replace\(|tempfile\.|\.mkstemp\(', {'core/files.py'}),  # atomic writes
    (r'\bfcntl\b|FileLock\(', {'core/files.py'}),  # file locks
    (r'isinstance\([^)]*DataParallel|\._orig_mod\b', {'core/state.py'}),  # unwrapping DDP and torch.compile
    (r'next\(\w+(\.\w+)*\.parameters\(\)', {'core/devices.py', 'core/checks.py'}),  # where a model is
    (r"'loss' in ", {'callbacks/metrics.py'}),  # which way is better
    (r'def format_time', {'callbacks/metrics.py'}),  # mm:ss, fastprogress's
    (r'torch\.bincount\(', {'data/normalise.py'}),  # counting pixel values for the statistics
    (r'def _tensors|def _move\(|def _copy_out|def shape_of', {'engines/compile.py'}),  # the nested-tensor walker
    (r'\* std \+ mean|- mean\) / std|/ \(255 \*', {'data/normalise.py'}),  # (un)normalising images
    (r'pin_memory=True\)', {'core/devices.py'}),  # pinned buffers (batches gathered, results copied out)
    (r'deepcopy\(\w*model', {'core/devices.py'}),  # copying a model (to the CPU: never a second copy on its GPU)
]


def code_lines(path: Path) -> list[str]:
    "The lines of a module without its docstrings and comments: the code that does the work."
    lines = path.read_text().splitlines()
    for node in ast.walk(ast.parse('\n'.join(lines))):
        body = getattr(node, 'body', None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(getattr(body[0], 'value', None), ast.Constant) and isinstance(body[0].value.value, str):
            for i in range(body[0].lineno - 1, body[0].end_lineno): lines[i] = ''
    return [line.split('  #')[0] for line in lines if not line.lstrip().startswith('#')]


@pytest.mark.parametrize('pattern,homes', ONE_PLACE, ids=[p for p, _ in ONE_PLACE])
def test_each_mechanism_lives_in_one_place(pattern, homes):
    found = {str(p.relative_to(PKG)) for p in PKG.rglob('*.py') if any(re.search(pattern, l) for l in code_lines(p))}
    assert found <= homes, f'{pattern!r} outside {sorted(homes)}: {sorted(found - homes)}'


def test_every_folder_of_the_package_is_a_package_the_wheel_will_hold():
    "find_packages skips a folder without __init__.py, and the wheel then lacks it (miniai/runs once did)."
    folders = {p.parent for p in PKG.rglob('*.py') if '__pycache__' not in p.parts}
    assert not [str(f.relative_to(PKG)) for f in folders if not (f / '__init__.py').exists()]
