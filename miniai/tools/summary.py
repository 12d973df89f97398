"""`summary`: each layer's input and output shapes, parameters and FLOPs, counted by PyTorch's own FLOP counter.

FLOPs are those `torch.utils.flop_counter.FlopCounterMode` counts: matrix multiplies and convolutions, two FLOPs per
multiply-add (fvcore and torchinfo count one). The course's formula (parameters times output height times width)
is several times off: it ignores the batch and counts biases and 1x1 shortcuts like full convolutions.
Looking never changes anything: parameters, gradients, buffers (BatchNorm statistics), train/eval modes, the
RNGs and the data loader's order are restored afterwards, and every hook is removed, also when the forward fails.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..core.checks import ModuleForwardError, forward_error
from ..core.devices import model_device
from ..core.learner import Learner, learner_method
from ..core.nested import first_shape as _shape
from ..core.state import unchanged

__all__ = ['Summary', 'summary', 'learner_summary', 'ModuleForwardError']


def _fmt(n: float) -> str:
    for unit, div in (('T', 1e12), ('G', 1e9), ('M', 1e6), ('K', 1e3)):
        if abs(n) >= div: return f'{n / div:.2f}{unit}'
    return f'{n:.0f}'


@dataclass
class Summary:
    "Rows (one per module) and totals of `summary`; shows as a Markdown table in Jupyter and as text elsewhere."
    rows: list = field(default_factory=list)
    totals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        "The rows and totals as plain data."
        return {'rows': [dict(r) for r in self.rows], 'totals': dict(self.totals)}

    def _cells(self):
        head = ['Module', 'Type', 'Input', 'Output', 'Params', 'Trainable', 'FLOPs']
        body = [[r['module'], r['type'], str(r['input_shape']), str(r['output_shape']), f"{r['params']:,}",
                 f"{r['trainable']:,}", _fmt(r['flops'])] for r in self.rows]
        return head, body

    def _footer(self) -> list[str]:
        t = self.totals
        return [f"Total params: {t['params']:,} ({t['trainable']:,} trainable), {t['param_bytes'] / 2**20:.2f} MiB",
                f"Forward FLOPs: {_fmt(t['flops'])} for input {t['input_shape']}; one training step (forward + "
                f"backward): {_fmt(t['train_step_flops']) if t['train_step_flops'] is not None else 'n/a'}"]

    def _repr_markdown_(self) -> str:
        head, body = self._cells()
        lines = ['|' + '|'.join(head) + '|', '|' + '|'.join('--' for _ in head) + '|']
        lines += ['|' + '|'.join(c.replace('|', '\\|') for c in row) + '|' for row in body]
        return '\n'.join(lines) + '\n\n' + '  \n'.join(self._footer()) + '\n'

    def __str__(self) -> str:
        head, body = self._cells()
        widths = [max(len(c) for c in col) for col in zip(head, *body)]
        fmt = lambda cells: '  '.join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        return '\n'.join([fmt(head), fmt(['-' * w for w in widths]), *map(fmt, body), '', *self._footer()])

    __repr__ = __str__


def _rows_at_depth(model: nn.Module, depth: int):
    "(path, module) pairs: the modules `depth` levels down, or shallower ones that have no children."
    out = []
    def walk(m, prefix, d):
        for name, c in m.named_children():
            path = f'{prefix}.{name}' if prefix else name
            if d >= depth or not any(True for _ in c.children()): out.append((path, c))
            else: walk(c, path, d + 1)
    walk(model, '', 1)
    return out or [('(model)', model)]


def _count_params(m: nn.Module):
    ps = list(m.parameters())
    return sum(p.numel() for p in ps), sum(p.numel() for p in ps if p.requires_grad)


def summary(model: nn.Module, x: torch.Tensor | Sequence[int], depth: int = 1, train_step: bool = True) -> Summary:
    """Run `model` once on `x` (a tensor, or a shape to fill with random numbers) and report, for each module
    `depth` levels down, its input and output shapes, parameters and forward FLOPs, with totals and the FLOPs of
    a training step. Nothing about the model changes."""
    if not isinstance(depth, int) or depth < 1: raise ValueError(f'summary: depth must be an int >= 1, got {depth!r}')
    with unchanged(model):
        if not isinstance(x, torch.Tensor):
            x = torch.randn(*x, generator=torch.Generator().manual_seed(0))
        x = x.to(model_device(model))
        rows = _rows_at_depth(model, depth)
        seen, stack, hooks = {}, [], []
        def pre(m, args): stack.append((m, _shape(args)))
        def post(m, args, out):
            if stack: stack.pop()
            if m in row_mods and m not in seen: seen[m] = (_shape(args), _shape(out))
        row_mods = {m for _, m in rows}
        for m in model.modules():
            hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
        counter = FlopCounterMode(display=False, depth=None)  # pyright: ignore[reportArgumentType]  (None: every depth)
        try:
            with torch.no_grad(), counter: model(x)
        except Exception as e:
            m, shape = stack[-1] if stack else (model, _shape(x))
            raise forward_error(model, m, shape, e) from e
        finally:
            for h in hooks: h.remove()
        flops = counter.get_flop_counts()
        root = type(model).__name__
        res = []
        for path, m in rows:
            n, t = _count_params(m)
            key = root if path == '(model)' else f'{root}.{path}'
            ishape, oshape = seen.get(m, (None, None))
            res.append({'module': path, 'type': type(m).__name__, 'input_shape': ishape, 'output_shape': oshape,
                        'params': n, 'trainable': t, 'flops': int(sum(flops.get(key, {}).values()))})
        step = _train_step_flops(model, x) if train_step else None
    n, t = _count_params(model)
    totals = {'params': n, 'trainable': t, 'flops': int(counter.get_total_flops()), 'train_step_flops': step,
              'param_bytes': sum(p.numel() * p.element_size() for p in model.parameters()),
              'input_shape': tuple(x.shape)}
    return Summary(res, totals)


def _train_step_flops(model: nn.Module, x: torch.Tensor) -> int | None:
    "FLOPs of a forward and a backward pass, counted (the gradients are thrown away by `unchanged`)."
    if not any(p.requires_grad for p in model.parameters()): return None
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().sum().backward()
    return int(counter.get_total_flops())


@learner_method(name='summary')
def learner_summary(self: Learner, depth: int = 1, train_step: bool = True) -> Summary:
    "`summary` of the Learner's model on the first batch of its training data (which is left in the same order)."
    dl = self.dls.train
    with unchanged(self.model, dl):  # drawing a batch moves the loader's (and maybe the global) generator on
        xb = next(iter(dl))[0]
        return summary(self.model, xb, depth=depth, train_step=train_step)

