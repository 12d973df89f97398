"""The main job: `python -m miniai train` trains a ResNet on Fashion-MNIST, or on your own images (`--data PATH`),
with the fastest safe settings; `python -m miniai predict RUN_OR_EXPORT FILES...` uses a trained run or an export on
new images (see `miniai.app.predict`).

Errors a user can fix (missing or damaged data, an unusable checkpoint, bad options) are reported in one line,
`miniai: error: ...`, with exit code 2; `--debug` or `MINIAI_DEBUG=1` shows their traceback. Anything else is a bug
and shows its traceback. Ctrl-C or SIGTERM stops at the next batch, saves, prints the command that goes on, and
exits with 130 or 143 (see `miniai.runs.interrupt`). Under `torchrun` it trains data-parallel, every rank stopping after
the same batch, and only global rank 0 prints and writes; `--resume auto` goes on from the run folder's newest
checkpoint, so a restarted or requeued job finishes by itself (docs/on-a-cluster.md)."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import time
import traceback
from datetime import datetime
from pathlib import Path

from .predict import add_predict_parser, predict_command
from .tasks import add_task_arguments, train_task

__all__ = ['main', 'build_parser', 'train']

PRECISIONS = ('auto', 'fp32', 'bf16', 'bf16-cl', 'fp16', 'channels-last')


def _checked(kind, ok, rule: str):
    "An argparse type: `kind(s)`, which must satisfy `ok`; `rule` says how in the error."
    def parse(s):
        try: v = kind(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {s!r}")
        if not ok(v): raise argparse.ArgumentTypeError(f'must be {rule}, got {s}')
        return v
    return parse


def _positive(kind): return _checked(kind, lambda v: v > 0, '> 0')
_nonneg = _checked(float, lambda v: v >= 0, '>= 0')
_fraction = _checked(float, lambda v: 0 <= v < 1, 'in [0, 1)')


class _Parser(argparse.ArgumentParser):
    "Reports a bad option in one line, `miniai: error: ...`, with exit code 2, as every error a user can fix."
    def error(self, message):
        self.exit(2, f'miniai: error: {message} (see `python -m {self.prog} --help`)\n')


class _Help(argparse.HelpFormatter):
    "Shows `(default: X)` only for options that take a value and have a default worth showing."
    def _get_help_string(self, action):
        h = action.help or ''
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0 or '%(default)' in h or 'default:' in h: return h
        return h + ' (default: %(default)s)'


def build_parser() -> argparse.ArgumentParser:
    "The command line's parser (`miniai train --help`)."
    p = _Parser(prog='miniai', description='miniai: train on Fashion-MNIST or your own images, and predict new ones, '
                                           'from the command line.')
    sub = p.add_subparsers(dest='command', metavar='COMMAND', required=True)
    t = sub.add_parser('train', help='train a ResNet on Fashion-MNIST or your images; save checkpoint, metrics, plots',
                       formatter_class=_Help)
    t.add_argument('--data', default='fashion',
                   help="'fashion' (Fashion-MNIST), or the path of a folder of images (a folder per class, in train/ "
                        "and valid/ or test/, or see --valid-pct) or of a Hugging Face DatasetDict saved with "
                        "save_to_disk")
    t.add_argument('--size', type=_positive(int), default=None,
                   help='resize images to SIZE x SIZE (scaled to cover it, centre cropped); needed when their sizes '
                        'differ')
    t.add_argument('--valid-pct', type=_checked(float, lambda v: 0 < v < 1, 'in (0, 1)'), default=None,
                   help='hold out this fraction of a folder\'s images for validation (seeded by --seed), for a folder '
                        'without valid/ or test/')
    t.add_argument('--epochs', type=_positive(int), default=8, help='passes over the training images')
    t.add_argument('--bs', type=_positive(int), default=256,
                   help='batch size, the global one: under torchrun each of the N processes takes bs/N a step')
    t.add_argument('--lr', type=_positive(float), default=1e-2, help='peak learning rate of the one-cycle schedule')
    t.add_argument('--model', choices=('fashion_resnet', 'fashion_resnet_wide', 'seed002_resnet', 'resnet9',
                                       'resnet9_small'), default='resnet9_small',
                   help="which network to train: resnet9_small (the fast-CIFAR ResNet-9 at width 32, 1.6 M "
                        "parameters) reached 94%% soonest (bench/results/time_to_accuracy.md); fashion_resnet_wide "
                        "(9.6 M) and fashion_resnet (4.9 M) are the course-style ResNets, resnet9 the width-64 "
                        "ResNet-9")
    t.add_argument('--arch', dest='model', metavar='NAME', default=argparse.SUPPRESS,
                   help='a torchvision or timm architecture (resnet18, convnext_tiny...) instead of --model, with a '
                        'new head for the data\'s classes and channels')
    t.add_argument('--pretrained', action='store_true',
                   help='with --arch: load its pretrained weights (downloaded once to $TORCH_HOME), normalise with their '
                        'stats, fine-tune (a frozen epoch at lr, then all at lr/200..lr/2); --resume downloads nothing')
    t.add_argument('--precision', choices=PRECISIONS, default='auto',
                   help="'auto' picks the fastest safe setting for this machine (bf16 autocast and channels-last on "
                        "CPUs with AMX/AVX-512 bf16, mixed precision on CUDA); 'fp32' is the plain path")
    t.add_argument('--out', type=Path, default=None, help='run folder (default: runs/<timestamp>)')
    t.add_argument('--resume', type=lambda s: s if s == 'auto' else Path(s), default=None,
                   help="checkpoint to continue from (e.g. runs/X/last.ckpt), or 'auto': the newest complete one in "
                        "--out (interrupted.ckpt, last.ckpt, best.ckpt; a damaged one is skipped), or a fresh start "
                        "when there is none (for jobs that are restarted or requeued)")
    t.add_argument('--seed', type=int, default=42, help='random seed (data order, initial weights, augmentation)')
    t.add_argument('--augment', choices=('auto', 'none', 'flip', 'crop-flip', 'full'), default='auto',
                   help="batch augmentation: 'full' is crop (pad 2), flip and random erasing; 'auto' picks what "
                        "measured best for the number of epochs: flip up to 5, crop-flip up to 20, full beyond")
    t.add_argument('--no-augment', dest='augment', action='store_const', const='none', help="same as --augment none")
    t.add_argument('--wd', type=_nonneg, default=0.05, help="AdamW's decoupled weight decay")
    t.add_argument('--label-smoothing', type=_fraction, default=0.1, help='label smoothing of the cross-entropy loss')
    t.add_argument('--drop', type=_fraction, default=None, help="dropout before the head (default: the model's own)")
    t.add_argument('--average', choices=('none', 'ema', 'swa'), default='ema',
                   help="validate on, and finish with, averaged weights: 'ema' an exponential moving average "
                        "(see --ema-decay), 'swa' an equal average over the last quarter of the steps")
    t.add_argument('--ema-decay', type=_checked(float, lambda v: 0 < v < 1, 'in (0, 1)'), default=0.999,
                   help='decay of the EMA of the weights, per optimizer step')
    t.add_argument('--target', type=_checked(float, lambda v: 0 < v <= 1, 'in (0, 1]'), default=0.94,
                   help='report the time from the start of training until the accuracy on the held-out split (the '
                        'test set of Fashion-MNIST, the validation split of other data) first reaches this')
    t.add_argument('--threads', type=_positive(int), default=None,
                   help='CPU threads for torch (default: torch\'s choice; on a busy machine 1 is often faster)')
    t.add_argument('--no-tta', dest='tta', action='store_false', help='skip test-time augmentation at the end')
    t.add_argument('--n-train', type=_positive(int), default=None, help='use only this many training images')
    t.add_argument('--n-valid', type=_positive(int), default=None,
                   help='use only this many validation images (Fashion-MNIST: test images)')
    t.add_argument('--no-summary', dest='summary', action='store_false', help="don't print the model summary")
    t.add_argument('--log', nargs='+', choices=('csv', 'tensorboard', 'wandb', 'mlflow'), default=['csv'],
                   metavar='LOGGER', help="where to log besides the terminal, one or several of csv (metrics.csv, always "
                   "written), tensorboard (RUN/tb), wandb (project 'miniai'; WANDB_MODE=offline keeps it in RUN), "
                   "mlflow (experiment 'miniai' at MLFLOW_TRACKING_URI) (default: csv)")
    t.add_argument('--run-name', default=None, help="the run's name in the trackers and the runs table (default: "
                   "the run folder's name)")
    t.add_argument('--debug', action='store_true',
                   help='show the traceback of errors reported in one line (also: environment MINIAI_DEBUG=1)')
    add_task_arguments(t)
    add_predict_parser(sub, _Help)
    r = sub.add_parser('runs', help='the runs under folders side by side: settings that differ, metrics, status',
                       formatter_class=_Help)
    r.add_argument('folders', nargs='*', type=Path, default=[Path('runs')], metavar='FOLDER',
                   help='run folders, or folders to look under for them (default: runs)')
    r.add_argument('--plot', type=Path, default=None, metavar='PNG', help="save their loss and metric curves there")
    return p


def main(argv: list[str] | None = None) -> int:
    "Entry point of `python -m miniai` and the `miniai` console script; returns the exit code."
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    args = parser.parse_args(argv)
    args.command_line = 'python -m miniai ' + shlex.join(argv)
    resume = getattr(args, 'resume', None)
    if resume == 'auto' and args.out is None:
        parser.error('--resume auto needs --out DIR: the run folder to look for checkpoints in')
    elif resume not in (None, 'auto') and not resume.exists():
        parser.error(f'--resume: no checkpoint at {args.resume}')
    from ..runs.interrupt import Interrupted, SignalGuard
    from ..callbacks.trackers import MissingClient, import_client
    for name in getattr(args, 'log', ()):
        if name in ('wandb', 'mlflow'):  # before any training: a missing client is said in one line
            try: import_client(name, name)
            except MissingClient as e:
                print(f'miniai: error: {e}', file=sys.stderr)
                return 2
    debug = getattr(args, 'debug', False) or os.environ.get('MINIAI_DEBUG', '') not in ('', '0')
    try:
        with SignalGuard():
            if args.command == 'train': train(args)
            elif args.command == 'predict': return predict_command(args)
            elif args.command == 'runs': return runs_command(args)
    except Interrupted as e:
        # exiting already: a late notice (torchrun passing on another rank's exit) must not turn this exit into a kill
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if debug: traceback.print_exc()
        from ..core.ranks import is_main_process
        if is_main_process(): _report_interrupt(e, argv, args.out)
        return e.exit_code
    except Exception as e:
        hint = _user_error_hint(e)
        # a user error with notes attached also had a cleanup fail: that part is a bug, so show everything
        if hint is None or debug or getattr(e, '__notes__', None): raise
        what = ' '.join(str(e).split())  # one line, whatever the message held
        print(f"miniai: error: {what.rstrip('.')}. {hint}" if hint else f'miniai: error: {what}', file=sys.stderr)
        return 2
    return 0


class _UserError(Exception): "An error in what the user asked for, reported in one line."


def _user_error_hint(e: BaseException) -> str | None:
    "What to add to the message of an error the user can fix; None for anything else (a bug: show the traceback)."
    from ..core.state import CheckpointError
    from ..data.decode import ImageDataError
    from ..data.fashion import FashionMNISTNotFound, IDXError
    from ..tools.export import ExportError
    from .runfolder import RunError
    if isinstance(e, (FashionMNISTNotFound, ImageDataError, _UserError, RunError, ExportError)):
        return ''  # their messages say what to do
    if isinstance(e, IDXError):
        return ("Replace the file (Debian's dataset-fashion-mnist package has good copies), or set MINIAI_DATA to a "
                "folder with good ones.")
    if isinstance(e, CheckpointError):
        return ('Give --resume a checkpoint that `miniai train` wrote in its --out folder (interrupted.ckpt, '
                'last.ckpt or best.ckpt), with the options that run was started with.')
    return None


def _continue_command(argv: list[str], out: Path | None, ckpt: Path | str) -> str:
    "The command line `argv` with its --out and --resume replaced: it goes on with the run in `out` from `ckpt`."
    keep, skip = [], False
    for a in argv:
        if skip: skip = False
        elif a in ('--out', '--resume'): skip = True
        elif not a.startswith(('--out=', '--resume=')): keep.append(a)
    return 'python -m miniai ' + shlex.join(keep + ['--out', str(out), '--resume', str(ckpt)])


def _report_interrupt(e, argv: list[str], out: Path | None) -> None:
    "Say where an interrupted run stopped, what was saved and the command that goes on with it."
    from ..core.ranks import world_size
    say = lambda m: print(f'miniai: {m}', file=sys.stderr, flush=True)
    say(e.describe() + (f' (all {world_size()} processes stopped after that batch)' if world_size() > 1 and
                        e.checkpoint is not None else ''))
    last = out / 'last.ckpt' if out is not None and (out / 'last.ckpt').is_file() else None
    if e.checkpoint is not None and world_size() > 1:
        say(f'to continue: start it again under torchrun with the same processes: '
            f'{_continue_command(argv, out, "auto")}')
    elif e.checkpoint is not None: say(f'to continue: {_continue_command(argv, out, e.checkpoint)}')
    elif e.where == 'at once' and last is not None:
        say(f'the last finished epoch is in {last}; to continue from it: {_continue_command(argv, out, last)}')
    elif e.where == 'after training' and last is not None:
        say(f'training had finished: its weights are in {last}')
    else: say('to start again: python -m miniai ' + shlex.join(argv))


def runs_command(args: argparse.Namespace) -> int:
    "`miniai runs`: print the table of the runs under `args.folders` (and save their curves with `--plot`)."
    from ..runs.compare import find_runs, runs_text
    if not find_runs(*args.folders):
        raise _UserError(f"no runs (folders with a metrics.csv) in {', '.join(map(str, args.folders))}")
    if args.plot is not None:
        import matplotlib
        matplotlib.use('Agg')
    print(runs_text(*args.folders, plot=args.plot))
    if args.plot is not None: print(f'Curves saved to {args.plot}')
    return 0


def train(args: argparse.Namespace) -> dict:
    "Run the main job described by `args` (see `build_parser`); returns the final metrics."
    import matplotlib
    matplotlib.use('Agg')
    from ..core.files import write_atomic
    from .recipe import logger_cbs, run_recipe
    from ..core.ranks import is_main_process, world_size
    import torch
    from ..engines.precision import warn_fp16_on_cpu
    from ..core.devices import default_device
    if args.precision == 'fp16' and torch.device(default_device()).type == 'cpu': warn_fp16_on_cpu()  # before any wait
    if args.threads is not None: torch.set_num_threads(args.threads)
    if world_size() > 1 and args.out is None:
        raise _UserError(f'under torchrun ({world_size()} processes) give --out DIR, the same folder for every node '
                         f'(a shared one across machines): the run folder the processes save to and resume from')
    if args.bs % world_size():
        raise _UserError(f'--bs {args.bs} is the global batch size and must divide evenly among the {world_size()} '
                         f'processes (each takes bs/{world_size()} a step)')
    out = args.out = args.out or Path('runs') / datetime.now().strftime('%Y%m%d-%H%M%S')  # main() reports it
    try:
        if is_main_process(): out.mkdir(parents=True, exist_ok=True)  # only global rank 0 writes there
    except OSError as e:
        raise _UserError(f'--out {out}: cannot make the run folder there ({e.strerror}); choose another') from e
    if (res := train_task(args, out)) is not None: return res  # a table or image pairs (miniai.app.tasks)
    start = time.perf_counter()
    trackers = logger_cbs(args.log, out, args.run_name)
    try:
        res = run_recipe(epochs=args.epochs, bs=args.bs, lr=args.lr, model=args.model, precision=args.precision,
                         out=out, resume=args.resume, seed=args.seed, augment=args.augment, use_tta=args.tta,
                         n_train=args.n_train, n_valid=args.n_valid, summary=args.summary, wd=args.wd,
                         label_smoothing=args.label_smoothing, drop=args.drop,
                         average=None if args.average == 'none' else args.average, ema_decay=args.ema_decay,
                         target=args.target, data=args.data, size=args.size, valid_pct=args.valid_pct,
                         pretrained=args.pretrained, cbs=trackers, run_name=args.run_name)
    except BaseException as e:  # after the fit (the fit closes them itself when it stops)
        for cb in trackers:
            if getattr(cb, 'is_open', False): cb.finish('interrupted' if isinstance(e, KeyboardInterrupt) else 'failed')
        raise
    if not is_main_process(): return res
    res['wall_seconds'] = round(time.perf_counter() - start, 1)
    res['threads'] = torch.get_num_threads()
    dev = torch.device(default_device())
    res['device'] = torch.cuda.get_device_name(dev) if dev.type == 'cuda' else dev.type
    if getattr(args, 'command_line', None): res['command'] = args.command_line
    # Fashion-MNIST's held-out split is its test set; on other data it is the validation split of that data
    res['measured_on'] = split = 'test' if args.data == 'fashion' else 'validation'
    write_atomic(out / 'result.json', json.dumps(res, indent=2) + '\n')
    files = [out / f for f in ('result.json', 'settings.json', 'metrics.csv', 'model.json', 'loss.png', 'lr.png',
                               'best.ckpt')]
    final = {k: res[k] for k in ('accuracy', 'tta_accuracy', 'time_to_target', 'wall_seconds') if res.get(k) is not None}
    for cb in trackers:
        if callable(getattr(cb, 'finish', None)): cb.finish(files=files, summary=final)
    print(f"\n{split.capitalize()} accuracy: {res['accuracy']:.4f}" + (f"  (with TTA: {res['tta_accuracy']:.4f})"
                                                                     if res.get('tta_accuracy') is not None else ''))
    if res.get('target') is not None:
        aim = (f"{res['target']:.1%} test accuracy" if split == 'test' else
               f"the target given, {res['target']:.1%} validation accuracy (--target {res['target']})")
        print(f"Time to {aim}: " + (f"{res['time_to_target']:.1f} s (in epoch {res['epoch_reached']} as numbered in "
                                    f"the table; {res['epochs_to_target']} epoch(s) of training)"
                                    if res.get('time_to_target') is not None else 'not reached'))
    print(f"Wall time: {res['wall_seconds']} s.  Saved in {out}/: " + ', '.join(sorted(
        p.name for p in out.iterdir())))
    return res
