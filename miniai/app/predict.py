"""`python -m miniai predict RUN_OR_EXPORT FILES_OR_FOLDER... [--out preds.csv]`: the class, its probability and the
top k of each image, as a table on the terminal and, with `--out`, as CSV. RUN_OR_EXPORT is a run folder of
`miniai train` (loaded with `load_run`) or a folder of `learn.export` (`load_exported`); each image is made into the
model's input as the training images were (`miniai.data.items.Preprocess`). A file that cannot be read or decoded is
one line of the output, saying why, not the end of the run."""
from __future__ import annotations

import argparse
import csv
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.files import write_atomic
from ..data.decode import ImageDataError
from ..data.items import image_files

__all__ = ['add_predict_parser', 'load_predictor', 'predict_files', 'predict_command']


def add_predict_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    "Add the `predict` command to the subcommands `sub` of the command line's parser."
    p = sub.add_parser('predict', help='predict the class of image files with a trained run or an export',
                       formatter_class=formatter)
    p.add_argument('model', type=Path, metavar='RUN_OR_EXPORT',
                   help='a run folder of `miniai train` (runs/X, with model.json and its checkpoints) or a folder '
                        'written by learn.export')
    p.add_argument('items', type=Path, nargs='+', metavar='FILES_OR_FOLDER',
                   help='image files, or folders (every image below them)')
    p.add_argument('--out', type=Path, default=None, help='also write the predictions to this CSV file')
    p.add_argument('--top-k', type=int, default=3, help='how many of the likeliest classes to list for each image')
    p.add_argument('--bs', type=int, default=64, help='images per batch')
    p.add_argument('--debug', action='store_true', help='show the traceback of errors reported in one line')


def load_predictor(folder: Path) -> tuple[Any, Callable[[torch.Tensor], torch.Tensor], list[str] | None]:
    """The model in `folder` (a run or an export) as `(preprocess, probabilities_of_batch, classes)`."""
    if (folder / 'miniai.json').is_file():
        from ..tools.export import load_exported
        m = load_exported(folder)
        return m.preprocess, lambda xb: m.predict(xb).probs, m.classes  # pyright: ignore[reportAttributeAccessIssue]  (a batch: one Prediction)
    from ..tools.inference import learner_preprocess
    from .runfolder import load_run
    learn = load_run(folder, data=None)
    return learner_preprocess(learn, 'miniai predict'), lambda xb: learn.predict(xb).probs, learn.dls.classes


def _files(items: list[Path]) -> list[Path]:
    "The files named and the images below the folders named, in order."
    out = []
    for p in items: out += image_files(p) if p.is_dir() else [p]
    return out


def predict_files(folder: Path, items: list[Path], top_k: int = 3, bs: int = 64) -> list[dict]:
    """One row per image of `items` (files or folders): `file`, `label`, `prob`, `top` ([(label, prob)] of the `top_k`
    likeliest classes), or `error` for a file that could not be made into an input."""
    prep, probs_of, classes = load_predictor(Path(folder))
    rows, ready = [], []
    for f in _files(items):
        try: ready.append((len(rows), prep.one(f, str(f))))
        except (ImageDataError, ValueError, TypeError, OSError) as e:
            rows.append({'file': str(f), 'error': ' '.join(str(e).split())})
            continue
        rows.append({'file': str(f)})
    for s in range(0, len(ready), bs):
        part = ready[s:s + bs]
        probs = probs_of(torch.stack([x for _, x in part]))
        top_p, top_i = probs.topk(min(top_k, probs.shape[1]), dim=1)
        for (i, _), ps, idx in zip(part, top_p.tolist(), top_i.tolist()):
            top = [(classes[j] if classes else j, p) for j, p in zip(idx, ps)]
            rows[i].update(label=top[0][0], prob=top[0][1], top=top)
    return rows


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator='\n')
    w.writerow(['file', 'label', 'prob', 'top_k', 'error'])
    for r in rows:
        top = ';'.join(f'{lab}:{p:.4f}' for lab, p in r.get('top', []))
        w.writerow([r['file'], r.get('label', ''), f'{r["prob"]:.4f}' if 'prob' in r else '', top, r.get('error', '')])
    return buf.getvalue()


def predict_command(args: argparse.Namespace) -> int:
    "Run `miniai predict` as `args` asks; returns the exit code (2 when no image could be predicted)."
    if args.top_k < 1 or args.bs < 1: raise ValueError('--top-k and --bs must be >= 1')
    rows = predict_files(args.model, args.items, args.top_k, args.bs)
    if not rows: raise ImageDataError(f'no images in {", ".join(map(str, args.items))}')
    width = min(60, max(len(r['file']) for r in rows))
    print(f'{"file":<{width}}  {"label":<16} {"prob":>6}  top {args.top_k}')
    for r in rows:
        if 'error' in r: print(f'{r["file"]:<{width}}  error: {r["error"]}')
        else: print(f'{r["file"]:<{width}}  {str(r["label"]):<16} {r["prob"]:>6.3f}  '
                    + ', '.join(f'{lab} {p:.3f}' for lab, p in r['top']))
    if args.out is not None:
        write_atomic(args.out, _csv(rows))
        print(f'Saved {len(rows)} rows in {args.out}')
    bad = sum('error' in r for r in rows)
    if bad:
        print(f'miniai: {bad} of {len(rows)} file(s) could not be read as images (see their lines)', file=sys.stderr)
    return 2 if bad == len(rows) else 0
