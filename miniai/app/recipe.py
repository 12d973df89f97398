"""The main job's recipe: a ResNet on Fashion-MNIST, or on your own images (a folder or a saved Hugging Face dataset),
with one-cycle AdamW, augmentation, the fastest safe precision, checkpoints, a metrics CSV, plots, and test-time
augmentation. `python -m miniai train` runs it, alone or under `torchrun` (data-parallel with `DDPCB`: the batch size
is the global one, each process takes its share, and only global rank 0 prints and writes)."""
from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable, Iterable
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import fastcore.all as fc
import matplotlib.pyplot as plt
import torch.nn.functional as F
from torch import nn, optim

from ..callbacks.averaging import WeightAverageCB
from ..callbacks.loggers import CSVLoggerCB, TimeToAccuracyCB
from ..callbacks.metrics import MetricsCB, quiet_torcheval
from ..callbacks.progress import ProgressCB
from ..callbacks.schedule import BatchSchedCB, RecorderCB
from ..callbacks.trackers import run_settings
from ..callbacks.transform import augment_cb
from ..core.events import Callback
from ..core.files import atomic_path, write_atomic
from ..core.learner import DeviceCB, Learner, TrainCB
from ..core.ranks import is_main_process, rank, world_size
from ..core.state import set_seed
from ..data.augment import RandCropPad, RandErase, RandFlip
from ..data.dataloaders import DataLoaders, dd_dls, folder_dls
from ..data.decode import ImageDataError
from ..data.fashion import fashion_dls
from ..data.hf import is_image_dd
from ..data.items import data_preprocess
from ..data.targets import Targets
from ..engines.ddp import DDPCB
from ..engines.plan import fastest_plan, fastest_settings
from ..engines.precision import precision_cbs
from ..models.resnet import fashion_resnet, resnet9, seed002_resnet
from ..models.backbones import weights_stats
from ..models.vision import vision_model
from ..runs.autoresume import choose_together, run_checkpoints
from ..runs.checkpoint import SaveModelCB
from ..runs.ckptfile import read_checkpoint
from ..runs.compare import SETTINGS_FILE
from ..runs.interrupt import InterruptCB, drills_from_env
from ..tools.inference import tta

__all__ = ['MODELS', 'AUGMENTS', 'RUN_FILE', 'RUN_FORMAT', 'augment_for', 'build_model', 'augment_tfms',
           'recipe_dls', 'make_learner', 'record_run', 'fine_tune_run', 'run_recipe', 'plot_run', 'LOGGERS', 'logger_cbs',
           'SETTINGS_FILE']
RUN_FILE, RUN_FORMAT = 'model.json', 'miniai-run-1'  # what rebuilds a run's model, next to its checkpoints
LOGGERS = ('csv', 'tensorboard', 'wandb', 'mlflow')

# bias=False: a convolution's bias is redundant before a BatchNorm, and runs saved before the library's convs took
# the course's biases (the recipe has always built its ResNets without them) must still resume
MODELS = {'fashion_resnet': partial(fashion_resnet, drop=0.1, bias=False),
          'fashion_resnet_wide': partial(fashion_resnet, nfs=(32, 64, 128, 256, 512, 512), drop=0.1, bias=False),
          'seed002_resnet': partial(seed002_resnet, act=nn.ReLU, norm=nn.BatchNorm2d, pool=True, bias=False),
          'resnet9': partial(resnet9, c=64), 'resnet9_small': partial(resnet9, c=32)}


AUGMENTS = {'none': lambda: [], 'flip': lambda: [RandFlip()],
            'crop-flip': lambda: [RandCropPad(2), RandFlip()],
            'full': lambda: [RandCropPad(2), RandFlip(), RandErase(pct=0.2, max_num=2)]}


def augment_for(epochs: int) -> str:
    """The augmentation level that measured best for a budget of `epochs` (bench/results/accuracy.md): flips only
    up to 5 epochs (stronger augmentation costs more than it gives so early), crops and flips up to 20, and random
    erasing as well beyond that."""
    return 'flip' if epochs <= 5 else 'crop-flip' if epochs <= 20 else 'full'


def build_model(name: str, drop: float | None = None, in_channels: int = 1, n_classes: int = 10,
                size: int | None = None) -> nn.Module:
    """A fresh model by name (see `MODELS`) for images of `in_channels` channels and `size` pixels (the larger side;
    the ResNet-9s pool large images down first) in `n_classes` classes, with dropout `drop` before the head if given.
    Any other name is a torchvision or timm architecture with a new head (`vision_model`, without pretrained weights:
    a run's checkpoint holds them)."""
    if name not in MODELS:
        head: dict[str, Any] = {} if drop is None else {'p': drop}
        try: return vision_model(name, n_classes, in_channels, pretrained=False, **head)[0]
        except ValueError as e:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}, or an architecture: "
                             f"{e}") from e
    takes = inspect.signature(MODELS[name]).parameters
    kw: dict[str, Any] = {} if drop is None else {'drop': drop}
    for k, v, default in (('in_channels', in_channels, 1), ('n_classes', n_classes, 10), ('size', size, None)):
        if k in takes and v is not None: kw[k] = v
        elif v != default and k != 'size':  # a model made for Fashion-MNIST's shape only (one added to MODELS)
            raise ValueError(f'model {name!r} takes no {k}, so it cannot be built for {k}={v}')
    return MODELS[name](**kw)


def augment_tfms(augment: str | bool, epochs: int | None = None) -> list[nn.Module]:
    """The batch transforms of an augmentation level (see `AUGMENTS`; True means 'full', False 'none', 'auto' the
    level `augment_for(epochs)` picks)."""
    if isinstance(augment, bool): augment = 'full' if augment else 'none'
    if augment == 'auto':
        if epochs is None: raise ValueError("augment='auto' needs the number of epochs to choose a level")
        augment = augment_for(epochs)
    if augment not in AUGMENTS:
        raise ValueError(f"unknown augmentation {augment!r}; choose one of auto, {', '.join(AUGMENTS)}")
    return AUGMENTS[augment]()


def recipe_dls(data: str = 'fashion', bs: int = 256, n_train: int | None = None, n_valid: int | None = None,
               seed: int = 42, size: int | tuple[int, int] | None = None, valid_pct: float | None = None, rank: int = 0,
               world_size: int = 1) -> DataLoaders:
    """The main job's data: Fashion-MNIST for 'fashion'; else `data` is a path, to a Hugging Face `DatasetDict` saved
    with `save_to_disk` or to a folder of images (a folder per class, see `DataLoaders.from_folder`). `rank` and
    `world_size` shard both loaders (each process of a torchrun job takes its part of every epoch)."""
    shard: dict[str, Any] = dict(rank=rank, world_size=world_size)
    if data == 'fashion': return fashion_dls(bs=bs, n_train=n_train, n_valid=n_valid, seed=seed, **shard)
    path, kw = Path(data).expanduser(), dict[str, Any](seed=seed, n_train=n_train, n_valid=n_valid, size=size, **shard)
    if not (path / 'dataset_dict.json').is_file(): return folder_dls(path, valid_pct=valid_pct, bs=bs, **kw)
    import datasets as hf
    dd = hf.load_from_disk(str(path))
    if not is_image_dd(dd):
        raise ImageDataError(f'{path}: a saved Hugging Face DatasetDict, but not of images (an Image column) and '
                             f'labels (a ClassLabel or integer label column), in two or more splits')
    return dd_dls(dd, bs, **kw)


def make_learner(model: nn.Module, dls: DataLoaders, epochs: int, lr: float, precision: str = 'auto',
                 augment: str | bool = 'full', out: Path | None = None, wd: float = 0.05, label_smoothing: float = 0.,
                 average: str | None = None, ema_decay: float = 0.999, target: float | None = None,
                 targets: Targets | None = None) -> tuple[Learner, str]:
    """The recipe's Learner: AdamW with a one-cycle schedule and the chosen callbacks; returns it and the precision.
    `average` ('ema' or 'swa') validates on averaged weights (`WeightAverageCB`); `target` notes when the validation
    accuracy first reaches it (`TimeToAccuracyCB`). A plain `Learner` whose steps come from `MixedPrecision` when the
    precision has one (fp16 on a GPU needs its loss-scaled backward and step), else from `TrainCB`. `targets` (a
    `miniai.data.targets.Targets`; default one class per image) gives the loss, the metrics and what is monitored."""
    with quiet_torcheval(): from torcheval.metrics import MulticlassAccuracy
    if precision == 'auto': precision, why = fastest_settings()
    else: why = 'chosen on the command line'
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=lr, total_steps=epochs * len(dls.train))
    prog = ProgressCB(plot=True if out is None else out / 'loss.png')  # a script: no live plot, a file
    metrics, monitor = ((targets.metrics(), targets.monitor) if targets else
                        (dict[str, Any](accuracy=MulticlassAccuracy()), 'accuracy'))
    cbs = [DeviceCB(), DDPCB(), MetricsCB(**metrics), prog, BatchSchedCB(sched),
           RecorderCB(lr=lambda cb: cb.pg['lr']), *precision_cbs(precision)]  # DDPCB: a no-op outside torchrun
    if tfms := augment_tfms(augment, epochs): cbs.append(augment_cb(*tfms))
    mode = 'min' if monitor in ('mse', 'mae') else 'max'  # errors: lower is better
    if out is not None:
        cbs += [SaveModelCB(out, monitor=monitor, mode=mode, every_epoch=True), CSVLoggerCB(out / 'metrics.csv')]
    if out is not None: cbs.append(InterruptCB(out / 'interrupted.ckpt'))  # Ctrl-C/SIGTERM: save there and stop
    if average is not None: cbs.append(WeightAverageCB(average, decay=ema_decay))
    if target is not None: cbs.append(TimeToAccuracyCB(target))
    # the implementation fastest_plan picks for the default device: fused on CPU and CUDA (bench/results/compile.md)
    opt = partial(optim.AdamW, eps=1e-5, weight_decay=wd, **fastest_plan().opt_kwargs())
    if not 0 <= label_smoothing < 1: raise ValueError(f'label_smoothing must be in [0, 1); got {label_smoothing}')
    loss = partial(F.cross_entropy, label_smoothing=label_smoothing) if label_smoothing else F.cross_entropy
    if targets is not None and targets.kind != 'class': loss = targets.loss
    if not any(isinstance(cb, TrainCB) for cb in cbs): cbs.append(TrainCB())  # MixedPrecision is a TrainCB
    return Learner(model, dls, loss, lr=lr, cbs=cbs, opt_func=opt), f'{precision} ({why})'


def logger_cbs(names: Iterable[str], out: Path, run_name: str | None = None) -> list:
    """The callbacks of `miniai train --log NAME ...`: 'csv' is `metrics.csv`, written by every run; 'tensorboard' writes
    under `out/tb`; 'wandb' logs to project 'miniai' with its files under `out` (`WANDB_MODE=offline` keeps them there);
    'mlflow' logs to experiment 'miniai' at `MLFLOW_TRACKING_URI` (else MLflow's default store). The trackers stay
    open after the fit, for the caller to add the run's result and plots (`finish`)."""
    from ..callbacks.clients import MLflowCB, WandBCB
    from ..callbacks.loggers import TensorBoardCB
    name = run_name or Path(out).name
    make = {'csv': lambda: None, 'tensorboard': lambda: TensorBoardCB(Path(out) / 'tb'),
            'wandb': lambda: WandBCB(dir=out, run_name=name, finish=False),
            'mlflow': lambda: MLflowCB(run_name=name, finish=False)}
    bad = [n for n in names if n not in make]
    if bad: raise ValueError(f"unknown logger {bad[0]!r}; choose from {', '.join(LOGGERS)}")
    return [cb for n in dict.fromkeys(names) if (cb := make[n]()) is not None]


def record_run(out: Path, model_args: dict, dls: DataLoaders, data_args: dict) -> Path:
    """Write `out/model.json`: what rebuilds the run's model without this recipe's code (`build_model`'s arguments),
    its classes and how its inputs are made (shape, normalisation, resize rule), and the data it was trained on
    (`recipe_dls`'s arguments): `miniai.app.runfolder.load_run` reads it."""
    prep = data_preprocess(dls).to_json()
    meta = {'format': RUN_FORMAT, 'build_model': model_args, 'classes': list(dls.classes or []), **prep,
            'data': data_args, 'targets': dls.targets.to_json() if hasattr(dls, 'targets') else None}
    write_atomic(Path(out) / RUN_FILE, json.dumps(meta, indent=1) + '\n')
    return Path(out) / RUN_FILE


def plot_run(learn: Learner, out: Path) -> list[Path]:
    "Save the loss curves and the learning-rate schedule of the last fit as PNGs in `out`."
    learn.progress.plot_losses()
    paths = [out / 'loss.png', out / 'lr.png']
    with atomic_path(paths[0]) as tmp: plt.savefig(tmp, dpi=80, bbox_inches='tight')
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.plot(learn.recorder.recs['lr'])
    ax.set_xlabel('batch')
    ax.set_ylabel('learning rate')
    with atomic_path(paths[1]) as tmp: fig.savefig(tmp, dpi=80, bbox_inches='tight')
    plt.close('all')
    return paths


def fine_tune_run(learn: Learner, epochs: int, lr: float, resume: str | os.PathLike | None,
                  pretrained_model: Callable[[], nn.Module]) -> None:
    """The recipe's fine-tune: one frozen epoch, then `epochs - 1` of everything at discriminative rates (their
    schedules are `fine_tune`'s). Fresh (`resume` None, or 'auto' finding no checkpoint), the weights are those of
    `pretrained_model()` (the download); resumed, the checkpoint's: one saved in the frozen epoch goes on there, one
    saved at its end starts the unfrozen fit from its weights, one of the unfrozen fit goes on in it."""
    learn.cbs = fc.L(cb for cb in learn.cbs if not isinstance(cb, BatchSchedCB))
    path = choose_together(learn, *run_checkpoints(learn)) if resume == 'auto' else resume
    if resume == 'auto' and is_main_process():
        print(f'miniai: resuming from {path}' if path else 'miniai: no checkpoint to resume from: starting fresh')
    if path is None:
        learn.model.load_state_dict(pretrained_model().state_dict())
        return learn.fine_tune(epochs - 1, base_lr=lr, freeze_epochs=1)
    ck = read_checkpoint(path)
    frozen, ended = bool(ck.get('frozen_to')), ck.get('position') is None and ck.get('epoch') == 0
    if frozen and ended: learn.load(path, with_opt=False)  # the frozen fit is done: the next starts from here
    learn.fine_tune(epochs - 1, base_lr=lr, freeze_epochs=int(frozen and not ended),
                    resume=None if frozen and ended else path)


def run_recipe(epochs: int = 8, bs: int = 256, lr: float = 1e-2, model: str = 'resnet9_small',
               precision: str = 'auto', out: Path = Path('runs/latest'), resume: str | Path | None = None, seed: int = 42,
               augment: str | bool = 'auto', use_tta: bool = True, n_train: int | None = None,
               n_valid: int | None = None, summary: bool = True,
               wd: float = 0.05, label_smoothing: float = 0.1, drop: float | None = None, average: str | None = 'ema',
               ema_decay: float = 0.999, target: float | None = 0.94, data: str = 'fashion',
               size: int | tuple[int, int] | None = None, valid_pct: float | None = None, pretrained: bool = False,
               cbs: Iterable[Callback] = (), run_name: str | None = None) -> dict:
    """Train on `data` (see `recipe_dls`), evaluate (with TTA) and save under `out`; returns the final metrics.
    `model` may be a torchvision or timm architecture (`resnet18`); with `pretrained` its weights are loaded, the data
    normalised with their statistics, and the run is `learn.fine_tune(epochs - 1, base_lr=lr)` (`fine_tune_run`).
    `resume`: a checkpoint, or 'auto' (the newest in `out`, else a fresh start). Under `torchrun`, `bs` is the global
    batch size (each of the N processes takes bs/N a step, so nothing else changes with N), and only global rank 0
    prints and writes. `cbs` are added to the Learner (`logger_cbs`: trackers get the run's settings); `run_name` is
    recorded in `settings.json` (default: the folder's name)."""
    out, n_procs = Path(out), world_size()
    if bs % n_procs:
        raise ValueError(f'batch size {bs} is the global one and must divide evenly among the {n_procs} processes')
    set_seed(seed)
    # sharded by global rank here, not only by DDPCB: the one-cycle schedule, built before the fit, counts its batches
    dls = recipe_dls(data, bs // n_procs, n_train, n_valid, seed, size, valid_pct, rank=rank(), world_size=n_procs)
    if augment == 'auto': augment = augment_for(epochs)
    (n, c, *hw), n_classes = dls.train.x.shape, len(dls.classes)
    model_args: dict[str, Any] = dict(name=model, drop=drop, in_channels=c, n_classes=n_classes, size=max(hw))
    head: dict[str, Any] = {} if drop is None else {'p': drop}
    if pretrained:  # its weights: downloaded on a fresh start, the checkpoint's on a resume (`fine_tune_run`)
        if model in MODELS: raise ValueError(f'--pretrained needs an architecture (--arch resnet18...), not {model!r}')
        net, _ = vision_model(model, n_classes, c, pretrained=False, **head)
        dls.normalize_with(*weights_stats(model, c))
    else: net = build_model(**model_args)
    learn, chosen = make_learner(net, dls, epochs, lr, precision, augment, out, wd=wd,
                                 label_smoothing=label_smoothing, average=average, ema_decay=ema_decay, target=target)
    learn.cbs += [*cbs, *drills_from_env()]  # $MINIAI_DRILL: rehearse a preemption (a signal at a given rank and batch)
    if n_procs > 1: set_seed(seed + rank())  # the same initial weights, then each rank augments from its own stream
    tfms = ', '.join(type(t).__name__ for t in augment_tfms(augment)) or 'none'
    batch = f'batch {bs}' + (f' (global: {bs // n_procs} per process on {n_procs} processes)' if n_procs > 1 else '')
    say = print if is_main_process() else lambda *a, **k: None
    say(f'Data: {data} ({n} training and {len(dls.valid.x)} validation images, {c}x{"x".join(map(str, hw))}, '
        f'{n_classes} classes)')
    say(f'Model: {model}; precision: {chosen}; {batch}, {epochs} epochs, one-cycle AdamW at lr {lr}, weight '
        f'decay {wd}; label smoothing {label_smoothing}; augmentation: {tfms}; seed {seed}'
        + {None: '', 'ema': f'; EMA of the weights (decay {ema_decay})',
           'swa': '; SWA over the last quarter'}[average], flush=True)
    summ = learn.summary() if summary and is_main_process() else None
    if summary and summ is not None: print(summ, '\n', sep='')
    extra = dict(run_name=run_name or out.name, started=datetime.now().isoformat(timespec='seconds'), data=str(data), model=model, epochs=epochs, bs=bs, seed=seed,
                 precision=chosen, augment=augment, wd=wd, label_smoothing=label_smoothing, drop=drop, average=average,
                 ema_decay=ema_decay if average == 'ema' else None, target=target, n_train=len(dls.train.x),
                 n_valid=len(dls.valid.x), flops=summ.totals['flops'] if summ else None)
    for cb in cbs:
        if hasattr(cb, 'config'):  # the trackers record the recipe's settings too
            cb.config = {**extra, **cb.config}  # pyright: ignore[reportAttributeAccessIssue]  (any callback with a config)
    if is_main_process():  # before the fit: an interrupted run's checkpoints can be loaded too
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / SETTINGS_FILE, json.dumps(run_settings(learn, extra), indent=1, default=str) + '\n')
        record_run(out, model_args, dls, dict(data=str(Path(data).resolve()) if data != 'fashion' else data,
                                              size=size, valid_pct=valid_pct, seed=seed, n_train=n_train,
                                              n_valid=n_valid))
    if pretrained: fine_tune_run(learn, epochs, lr, resume, lambda: vision_model(model, n_classes, c, **head)[0])
    else: learn.fit(epochs, resume=resume)
    last = [r for r in learn.metrics.history if r['train'] == 'eval'][-1]
    res = {'data': str(data), 'model': model, 'epochs': epochs, 'bs': bs, 'lr': lr, 'seed': seed, 'precision': chosen,
           'augment': augment, 'wd': wd, 'label_smoothing': label_smoothing, 'drop': drop,
           'average': average, 'accuracy': last['accuracy'], 'loss': last['loss'], 'processes': n_procs}
    if (clock := getattr(learn, 'time_to_accuracy', None)) is not None:
        res.update(target=target, time_to_target=None if clock.reached is None else clock.reached['seconds'],
                   epochs_to_target=None if clock.reached is None else clock.reached['epoch'] + 1,
                   epoch_reached=None if clock.reached is None else clock.reached['epoch'], curve=clock.curve)
    if not is_main_process(): return res  # the others trained; rank 0 evaluates and writes
    if use_tta: res['tta_accuracy'] = tta(learn)['tta_accuracy']
    learn.save(out / 'final.ckpt')
    plot_run(learn, out)
    return res
