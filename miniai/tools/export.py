"""Export for inference: `learn.export(folder)` writes what running the model needs without the training code, and
`load_exported(folder)` gives back a callable that returns what the Learner's model returns.

The folder holds `model.pt2`, a `torch.export` program (the graph of aten operations and the weights as raw tensors:
loading it needs neither the model's class nor miniai, `torch.export.load(path).module()`), and `miniai.json`: the
input shape and dtype, the normalisation (`mean`, `std` of [0, 1] pixels) and the class names. The program takes
batches of any size. Where `torch.export` cannot take a model (Python control flow on tensor values, say), the
folder holds `weights.safetensors` instead, the reason is said, and loading needs an instance of the model's class.

`torch.export.load` is not safe for files from others: a .pt2 archive can make it unpickle arbitrary
objects (weights or constants marked as pickles; example inputs, retried with `weights_only=False` when the safe
load fails), load compiled libraries (AOTInductor), run Python code (a file with example inputs has its
`guards_code` executed when the module runs: tried here; symbolic expressions go through `sympy.sympify`, which
evaluates), and call any function reachable from the `torch` module (a node's target such as `torch.os.system`). So
`load_exported` reads the file once into memory and checks it before torch sees it: only the files `export` writes,
no pickles and no example inputs, no guards code, every node an aten operation or a plain arithmetic one, every
symbolic expression made of sizes and arithmetic. What does not pass is refused.
"""
from __future__ import annotations

import io
import json
import os
import logging
import re
import warnings
import zipfile
from collections.abc import Callable
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..core.devices import cpu_copy, model_dtype
from ..core.files import atomic_path, write_atomic
from ..core.learner import Learner, learner_method
from ..core.state import plain_state_dict, unwrap_model
from ..data.items import RESIZE_RULE, Preprocess
from ..data.normalise import Normalise
from ..data.targets import Targets
from .inference import Prediction, batch_of, input_shape, kind_predictions, predictions, targets_of

__all__ = ['ExportError', 'ExportedModel', 'export', 'load_exported', 'check_program']

FORMAT = 'miniai-export-1'


class ExportError(ValueError):
    "An export folder that cannot be loaded: missing, damaged, not miniai's, or a program that fails the safety check."


def _first_reason(e: BaseException) -> str:
    "Why torch.export failed, in a line: what it said first, and what that means where we know it."
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    said = f'{type(e).__name__}: {lines[0] if lines else ""}'[:240]
    if 'data-dependent' in said:
        return f'its forward branches on the values of a tensor, which a graph cannot hold; {said}'
    return said


@contextmanager
def _torch_quiet():
    "torch logs warnings and prints whole graphs while an export fails; the one-line reason we give says what matters."
    log, out = logging.getLogger('torch'), io.StringIO()
    level, log.level = log.level, logging.ERROR
    try:
        with redirect_stdout(out), redirect_stderr(out): yield
    finally: log.setLevel(level)


def _exported(m: nn.Module, example: torch.Tensor):
    """`m` as a torch.export program for batches of any size and, where the model allows it, images of any size
    (from 2 pixels, else from the training size up, to 8192): the program and the smallest (height, width) it takes,
    None where its image size is fixed. A program that holds guards (conditions on the sizes, which torch would check
    by running code) is not taken."""
    Dim = torch.export.Dim
    batch = {0: Dim('batch', min=1)}
    smallest = [(2, 2), tuple(example.shape[2:])] if example.dim() == 4 else []  # images: try a dynamic size
    for lo in smallest + [None]:
        dynamic = lo is not None
        dims = {**batch, 2: Dim('height', min=lo[0], max=8192), 3: Dim('width', min=lo[1], max=8192)} if dynamic \
            else batch
        try: ep = torch.export.export(m, (example,), dynamic_shapes=(dims,))
        except Exception:  # torch.export's errors are many kinds (constraints violated, guards, unsupported ops...)
            if dynamic: continue
            raise
        if getattr(ep, '_guards_code', None):
            if dynamic: continue
            raise ValueError('the exported program holds guards code')
        if not torch.allclose(ep.module()(example), m(example), rtol=1e-4, atol=1e-5):
            if dynamic: continue
            raise ValueError("the exported program's outputs differ from the model's")
        return ep, lo


@learner_method
def export(self: Learner, path: str | os.PathLike, n_example: int = 2) -> Path:
    """Write the Learner's model for inference to the folder `path` (see this module's docstring): a `torch.export`
    program for batches of any size (and images of any size where the model allows it), traced on `n_example` items
    of the validation data's shape in eval mode, or its weights where torch.export cannot take it (with a warning
    saying why); and the preprocessing facts (shape, normalisation, resize rule, classes), so that
    `load_exported(path).predict(item)` takes what `learn.predict` takes. The Learner's model is left as it was.
    Returns the folder."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dls, model = self.dls, unwrap_model(self.model)
    shape = input_shape(self)
    m = cpu_copy(model).eval()  # a copy: the Learner's model keeps its device and mode
    dtype = model_dtype(m)
    example = torch.randn(n_example, *shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    plain = lambda v: v.tolist() if isinstance(v, torch.Tensor) else v
    meta = {'format': FORMAT, 'torch': torch.__version__, 'input_shape': list(shape),
            'input_dtype': str(dtype).replace('torch.', ''),
            'mean': plain(getattr(dls, 'mean', None)), 'std': plain(getattr(dls, 'std', None)),
            'classes': list(getattr(dls, 'classes', None) or []) or None, 'targets': targets_of(self).to_json(),
            'model_class': f'{type(model).__module__}.{type(model).__qualname__}', 'resize': RESIZE_RULE,
            'dynamic_size': False}
    for old in ('model.pt2', 'weights.safetensors'): (path / old).unlink(missing_ok=True)
    try:
        with torch.no_grad(), _torch_quiet(): ep, smallest = _exported(m, example)  # pyright: ignore[reportGeneralTypeIssues]
        meta.update(dynamic_size=smallest is not None, min_size=smallest and list(smallest))
        ep.example_inputs = None  # kept out: loading them is a pickle
        with atomic_path(path / 'model.pt2') as tmp:
            torch.export.save(ep, tmp)
            check_program(tmp.read_bytes(), path / 'model.pt2')
        meta['kind'] = 'program'
    except Exception as e:  # torch.export's own errors are many kinds (dynamo's, guards', unsupported ops...)
        (path / 'model.pt2').unlink(missing_ok=True)
        meta.update(kind='weights', why=_first_reason(e))
        with atomic_path(path / 'weights.safetensors') as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in plain_state_dict(m).items()}, str(tmp))
        warnings.warn(f'learn.export: torch.export could not take {type(model).__name__} ({meta["why"]}), so '
                      f'{path} holds its weights (weights.safetensors) instead of a program: loading needs the '
                      f'model\'s class, load_exported({str(path)!r}, model={type(model).__name__}(...))', stacklevel=2)
    write_atomic(path / 'miniai.json', json.dumps(meta, indent=1) + '\n')
    return path


# -- checking a program before torch loads it ------------------------------------------------------------------------
_FILES = re.compile(r'(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id'
                    r'|models/model\.json|data/weights/model_weights_config\.json|data/weights/weight_\d+'
                    r'|data/constants/model_constants_config\.json|data/constants/tensor_\d+'
                    r'|data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]+)')
_TARGETS = re.compile(r'torch\.ops\.(aten|prims)\.\w+\.\w+|_operator\.(getitem|add|sub|mul|floordiv|truediv|mod|pow|neg'
                      r'|pos|abs|eq|ne|lt|le|gt|ge|and_|or_|not_)|torch\.sym_(int|float|max|min|not|sqrt|ite)'
                      r'|math\.(ceil|floor|trunc|sqrt)')
_EXPR_NAMES = {'Symbol', 'Integer', 'Float', 'Rational', 'positive', 'integer', 'real', 'True', 'False', 'oo', 'Mul',
               'Add', 'Pow', 'Max', 'Min', 'Mod', 'FloorDiv', 'CeilDiv', 'CleanDiv', 'PythonMod', 'ModularIndexing',
               'FloorToInt', 'CeilToInt', 'TruncToInt', 'Eq', 'Ne', 'Lt', 'Le', 'Gt', 'Ge', 'And', 'Or', 'Not', 'Where'}


def _safe_expr(s: str) -> bool:
    "Whether a symbolic expression (which sympy evaluates) holds only sizes, numbers and arithmetic."
    rest = re.sub(r"'[su]\d+'", '', s)
    if not re.fullmatch(r"[A-Za-z0-9_(),=+\-*/ .]*", rest) or re.search(r'\.(?!\d)|__', rest): return False
    return all(re.fullmatch(r'[su]\d+', n) or n in _EXPR_NAMES for n in re.findall(r'[A-Za-z_]\w*', rest))


def _walk(o, key=None):
    "Every (key, value) pair in a JSON document, depth first."
    if isinstance(o, dict):
        for k, v in o.items():
            yield k, v
            yield from _walk(v, k)
    elif isinstance(o, list):
        for v in o: yield from _walk(v, key)


def check_program(data: bytes, where: object) -> None:
    "Raise `ExportError` unless the .pt2 archive `data` passes the checks of this module's docstring."
    def bad(why): raise ExportError(f'{where}: refused to load: {why} (load_exported takes only programs as '
                                    f'learn.export writes them; torch.export.load would run what such a file asks)')
    try: z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile as e: raise ExportError(f'{where}: not a .pt2 archive ({e})') from None
    names = z.namelist()
    roots = {n.split('/', 1)[0] for n in names}
    if len(roots) != 1: bad(f'{len(roots)} top-level folders')
    root = roots.pop() + '/'
    if odd := [n for n in names if not n.startswith(root) or not _FILES.fullmatch(n[len(root):])]:
        bad(f'unexpected files {odd[:5]}')
    read = lambda n: z.read(root + n)
    if read('archive_format') != b'pt2' or f'{root}models/model.json' not in names: bad('not a torch.export archive')
    if f'{root}data/sample_inputs/model.pt' in names and read('data/sample_inputs/model.pt'): bad('example inputs')
    for kind in ('weights', 'constants'):
        cfg = json.loads(read(f'data/{kind}/model_{kind}_config.json'))['config']
        if pickled := [k for k, v in cfg.items() if v.get('use_pickle') or not re.fullmatch(r'(weight|tensor)_\d+',
                                                                                                v['path_name'])]:
            bad(f'{kind} {pickled[:5]} are pickled objects, not raw tensors')
    graph = json.loads(read('models/model.json'))
    if graph.get('guards_code'): bad('it carries guards code, which torch executes')
    g = graph['graph_module']['graph']
    if g.get('custom_obj_values'): bad('custom objects')
    if odd := sorted({n['target'] for n in g['nodes'] if not _TARGETS.fullmatch(n['target'])}):
        bad(f'operations that are not aten ones: {odd[:5]}')
    exprs = [v for k, v in _walk(graph) if k == 'expr_str'] + list(graph.get('range_constraints', {}))
    if odd := [e for e in exprs if not isinstance(e, str) or not _safe_expr(e)]: bad(f'symbolic expressions {odd[:3]}')
    if any(k == 'as_graph' for k, _ in _walk(graph)): bad('nested graphs')


# -- loading ----------------------------------------------------------------------------------------------------------
@dataclass
class ExportedModel:
    """A model loaded by `load_exported`: call it on a batch as the Learner's model was called; `normalize` turns
    [0, 1] pixels into its input, `predict` gives classes and probabilities. `meta` holds what `miniai.json` says."""
    fn: Callable[..., Any]
    meta: dict = field(default_factory=dict)

    input_shape = property(lambda self: tuple(self.meta['input_shape']))
    classes = property(lambda self: self.meta.get('classes'))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        "The model's output for a batch of its inputs (normalised floats); an input it cannot take is named first."
        if why := self.refuses(x): raise ValueError(why)
        with torch.no_grad(): return self.fn(x)

    def refuses(self, x: torch.Tensor) -> str | None:
        "Why the program cannot take the batch `x` (its dtype or shape), in words a user can act on; else None."
        shape, dtype = self.input_shape, self.meta['input_dtype']
        fix = ('use .predict(item), which takes files, PIL images and uint8 pixels and resizes and normalises them as '
               'the training images were')
        if not isinstance(x, torch.Tensor):
            return f'the exported model takes a batch tensor, not {type(x).__name__}: {fix}'
        if x.dtype == torch.uint8:
            return (f'the exported model takes normalised {dtype} batches, but got uint8 pixels that were never '
                    f'normalised: {fix} (or .normalize(x) for a batch of the right size)')
        if not x.is_floating_point(): return f'the exported model takes {dtype} batches, but got {x.dtype}: {fix}'
        if x.dim() != len(shape) + 1: return (f'the exported model takes batches [N, {", ".join(map(str, shape))}], '
                                              f'got shape {tuple(x.shape)}: {fix}')
        low = self.meta.get('min_size')
        fits = x.shape[1] == shape[0] and (tuple(x.shape[2:]) == shape[1:] if not self.meta.get('dynamic_size') else
                                           all(a >= b for a, b in zip(x.shape[2:], low)))  # pyright: ignore[reportArgumentType]  (min_size is there when dynamic_size is)
        if fits: return None
        takes = f'images of {shape[0]} channel(s) from {low[0]}x{low[1]} (HxW) up' if self.meta.get('dynamic_size') \
            else f'{"x".join(map(str, shape))} (CxHxW) inputs'
        return f'the exported model takes {takes}, got a batch of shape {tuple(x.shape)}: {fix}'

    preprocess = property(lambda self: Preprocess.from_json(self.meta, 'load_exported(...).predict'),
                          doc='How new items become inputs, as training made them (shape, normalisation, resize rule).')

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] (uint8 are divided by 255) normalised as in training: an image or a batch, grey images
        with or without their channel dimension; the result is a batch."""
        shape = self.input_shape
        if shape[0] == 1 and tuple(x.shape[-2:]) == shape[1:] and tuple(x.shape[-3:]) != shape: x = x.unsqueeze(-3)
        if x.dim() == len(shape): x = x[None]
        mean, std = self.meta.get('mean'), self.meta.get('std')
        if mean is not None: x = Normalise(mean, std, channels=shape[0], spatial_dims=len(shape) - 1).encode(x)  # pyright: ignore[reportArgumentType]  (mean and std come together)
        elif x.dtype == torch.uint8: x = x.float() / 255
        return x.to(getattr(torch, self.meta['input_dtype']))

    def predict(self, x: Any) -> Prediction | list[Prediction]:
        """The class of `x` (named if known), its probability and all probabilities: `x` as `learn.predict` takes it
        (a path, a PIL image, uint8 pixels or normalised floats; one item, a list or a batch), the same result."""
        xb, how = batch_of(self.preprocess, x)
        out = self(xb.to(getattr(torch, self.meta['input_dtype']))).float()
        if (t := Targets.from_json(self.meta.get('targets'))).kind != 'class':  # exports older than kinds: classes
            return kind_predictions(t, t.activate(out), how)
        return predictions(out.softmax(1), self.classes, how)


def load_exported(path: str | os.PathLike, model: nn.Module | None = None) -> ExportedModel:
    """Load what `learn.export(path)` wrote: the program (checked first, see this module's docstring; no model class
    needed) or, where the export fell back to weights, those weights into `model`, an instance of the model's class.
    The result runs on the CPU, in eval mode."""
    path = Path(path)
    try: meta = json.loads((path / 'miniai.json').read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f'{path}: no readable miniai.json ({e}); is it a folder learn.export wrote?') from None
    if meta.get('format') != FORMAT: raise ExportError(f'{path}: format {meta.get("format")!r}, expected {FORMAT!r}')
    if meta['kind'] == 'program':
        data = (path / 'model.pt2').read_bytes()  # read once: what is checked is what torch loads
        check_program(data, path / 'model.pt2')
        try: program = torch.export.load(io.BytesIO(data))
        except Exception as e:
            # a torch.export archive is read only by the torch release that wrote it (or a close one)
            wrote = meta.get('torch', 'an unrecorded version')
            raise ExportError(f'{path / "model.pt2"}: torch {torch.__version__} cannot read this program, written by '
                              f'torch {wrote} ({type(e).__name__}: {e}); load it with that torch, or export again with '
                              f'this one') from e
        return ExportedModel(program.module(), meta)
    if model is None:
        raise ExportError(f'{path} holds the weights of a {meta["model_class"]} (torch.export could not take it: '
                          f'{meta.get("why")}): pass model=, an instance of that class, to load them into')
    try: model.load_state_dict(load_file(str(path / 'weights.safetensors')))
    except RuntimeError as e:
        raise ExportError(f'{path}: the weights of a {meta["model_class"]} do not fit the {type(model).__name__} '
                          f'given: {e}') from None
    return ExportedModel(model.cpu().eval(), meta)

