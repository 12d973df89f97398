"""The main job for targets beyond one class per image: `python -m miniai train --data PATH --task ...` where PATH holds
a table (`labels.csv`: file names, then labels or numbers) or image pairs (`inputs/` and `targets/` of the same names).
A segmentation folder (`images/`, `labels/`, `codes.txt`) trains a U-Net (`--arch` names its encoder's backbone; by
default a small one of four stages). The task is `--task`, else inferred from the data (see `data_task`); a folder per class, a saved Hugging Face set and
Fashion-MNIST go to the classification recipe (`miniai.app.recipe.run_recipe`) as before. The Learner is the
recipe's (`make_learner`: one-cycle AdamW, precision, checkpoints, metrics.csv, plots) with the targets' own loss,
metrics and monitored value; the run folder also gets `results.png` (`learn.show_results()`)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..data.decode import ImageDataError

from typing import TYPE_CHECKING
if TYPE_CHECKING:  # names for the annotations only
    from collections.abc import Callable
    from typing import Any

    from torch import nn

    from ..models.segment import BodyUNet

__all__ = ['TASKS', 'add_task_arguments', 'data_task', 'image_model', 'value_head', 'seg_model', 'train_task']

TASKS = ('auto', 'class', 'multilabel', 'regression', 'image', 'segmentation')


def add_task_arguments(t: argparse.ArgumentParser) -> None:
    "The options of `miniai train` for targets beyond one class per image."
    t.add_argument('--task', choices=TASKS, default='auto',
                   help="what the targets are (auto: image pairs for a --data folder with inputs/ and targets/; "
                        "segmentation for one with images/, labels/ and codes.txt; from "
                        "its --csv table: multilabel when the labels hold --label-delim, regression when they are "
                        "numbers, else class; a folder per class otherwise)")
    t.add_argument('--csv', default='labels.csv', help='the table in --data: file names, then labels or numbers')
    t.add_argument('--label-delim', default=';', help='what separates the labels of a multi-label table')
    t.add_argument('--label-fn', default=None, metavar='PATTERN',
                   help="segmentation: each image's mask in labels/, e.g. '{stem}_P{suffix}' (CamVid); default: the "
                        "image's own name")


def _labels(file: Path) -> list[str]:
    "The label column (the second) of the table `file`."
    from ..data.tables import read_csv_table
    columns, rows = read_csv_table(file)
    if len(columns) < 2: raise ImageDataError(f'{file}: a file-name column and a label column are needed')
    return [r[1] for r in rows if len(r) > 1]


def data_task(data: str, task: str = 'auto', csv: str = 'labels.csv', label_delim: str = ';') -> str | None:
    """The kind of targets of `data` where it is a table or image pairs (`--task`, or inferred: see
    `add_task_arguments`); None where the classification recipe reads it (a folder per class, Fashion-MNIST)."""
    path = Path(data).expanduser()
    pairs = data != 'fashion' and (path / 'inputs').is_dir() and (path / 'targets').is_dir()
    table = data != 'fashion' and (path / csv).is_file()
    if pairs and task in ('auto', 'image'): return 'image'
    seg = data != 'fashion' and all((path / p).exists() for p in ('images', 'labels', 'codes.txt'))
    if seg and task in ('auto', 'segmentation'): return 'segmentation'
    if table and task != 'image':
        if task != 'auto': return task
        labels = _labels(path / csv)
        if any(label_delim in v for v in labels): return 'multilabel'
        from ..data.tables import numbers_only
        return 'regression' if numbers_only(labels) else 'class'
    if task in ('auto', 'class'): return None
    if task == 'segmentation':
        raise ImageDataError(f'--task segmentation needs images/, labels/ (a mask for each image) and codes.txt (the '
                             f"codes' names, one a line) in --data {data}")
    need = 'inputs/ and targets/ folders of images of the same names' if task == 'image' else \
        f'a table {csv} (file names, then {"labels" if task == "multilabel" else "numbers"})'
    raise ImageDataError(f'--task {task} needs {need} in --data {data}')


def image_model(in_channels: int, out_channels: int, scale: int = 1, width: int = 32) -> nn.Module:
    """A small image-to-image network: bilinear upscaling by `scale` (super-resolution; 1 keeps the size), then
    convolutions that predict the correction to the upscaled input."""
    import torch
    from torch import nn

    class ImageToImage(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.Upsample(scale_factor=scale, mode='bilinear') if scale > 1 else nn.Identity()
            self.body = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1), nn.ReLU(),
                                      nn.Conv2d(width, width, 3, 1, 1), nn.ReLU(),
                                      nn.Conv2d(width, out_channels, 3, 1, 1))
            self.skip = nn.Conv2d(in_channels, out_channels, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.up(x)
            return self.skip(x) + self.body(x)
    return ImageToImage()


def value_head(net: nn.Module) -> nn.Module:
    """`net` with its last linear layer free to output any value: the recipe's ResNets end with a BatchNorm of their
    outputs (good for class scores), which would hold regression outputs near mean 0 and std 1; it is dropped and
    the linear layer given a bias."""
    from torch import nn
    if isinstance(net, nn.Sequential) and isinstance(net[-1], nn.BatchNorm1d) and isinstance(net[-2], nn.Linear):
        net[-2], net[-1] = nn.Linear(net[-2].in_features, net[-2].out_features), nn.Identity()  # pyright: ignore[reportArgumentType]  (net[-2] is the nn.Linear checked above: an indexed item is not narrowed)
    return net


def seg_model(in_channels: int, n_codes: int, arch: str | Callable[..., nn.Module] | None = None,
              pretrained: bool = False, width: int = 32) -> BodyUNet:
    """A U-Net (`miniai.models.segment.BodyUNet`) scoring `n_codes` codes a pixel: its encoder `arch`'s body (a
    torchvision name, with its pretrained weights if asked), else four small stages (full size, then halved thrice)."""
    from torch import nn
    from ..models.backbones import adapt_first_conv, load_backbone
    from ..models.layers import conv
    from ..models.segment import BodyUNet
    if arch:
        body, _ = load_backbone(arch, pretrained, in_channels)  # torchvision's: an nn.Sequential (create_body)
        adapt_first_conv(body, in_channels)
    else:
        ws = [width, 2 * width, 4 * width, 4 * width]
        body = nn.Sequential(*[conv(ni, nf, stride=1 if i == 0 else 2, norm=nn.BatchNorm2d, bias=False)
                               for i, (ni, nf) in enumerate(zip([in_channels, *ws], ws))])
    return BodyUNet(body, n_codes, in_channels)  # pyright: ignore[reportArgumentType]  (see load_backbone above)


def _dls(args, task: str):
    from ..data.dataloaders import DataLoaders
    kw: dict[str, Any] = dict(bs=args.bs, seed=args.seed, size=args.size, valid_pct=args.valid_pct or 0.2,
                              n_train=args.n_train, n_valid=args.n_valid)
    if task == 'image': return DataLoaders.from_image_pairs(args.data, **kw)
    if task == 'segmentation':
        if args.n_train or args.n_valid: raise ImageDataError('--n-train/--n-valid: not for --task segmentation')
        return DataLoaders.from_masks(args.data, bs=args.bs, seed=args.seed, size=args.size,
                                      valid_pct=args.valid_pct or 0.2, label_fn=args.label_fn)
    return DataLoaders.from_csv(args.data, args.csv, label_delim=args.label_delim if task == 'multilabel' else None,
                                y_block=task, **kw)


def train_task(args: argparse.Namespace, out: Path) -> dict | None:
    """Run `miniai train` on a table or image pairs (see this module's docstring) into the run folder `out`; None
    where `args.data` is for the classification recipe."""
    if (task := data_task(args.data, args.task, args.csv, args.label_delim)) is None: return None
    import matplotlib.pyplot as plt
    from ..core.files import atomic_path, write_atomic
    from ..core.ranks import world_size
    from ..core.state import set_seed
    from .recipe import build_model, make_learner, plot_run, record_run
    if world_size() > 1: raise ImageDataError(f'--task {task} trains in one process; torchrun is for class folders')
    set_seed(args.seed)
    dls = _dls(args, task)
    (n, c, *hw), t = dls.train.x.shape, dls.targets
    if task == 'segmentation':
        from .recipe import MODELS
        arch = None if args.model in MODELS else args.model  # --arch NAME: a backbone for the encoder
        model_args, net = None, seg_model(c, t.n_out, arch, getattr(args, 'pretrained', False))  # pyright: ignore[reportArgumentType]  (a mask's Targets has its codes: n_out is an int)
    elif task == 'image':
        model_args, net = None, image_model(c, dls.train.y.shape[1], dls.train.y.shape[-1] // hw[-1])
    else:
        model_args = dict(name=args.model, drop=args.drop, in_channels=c, n_classes=t.n_out, size=max(hw))
        net = build_model(**model_args)
        if task == 'regression': net = value_head(net)
    # flips change values; image pairs and masks need their targets moved too (augment_cb(aug_transforms(...),
    # targets='mask') in code)
    augment = args.augment if task in ('class', 'multilabel') else 'none'
    learn, chosen = make_learner(net, dls, args.epochs, args.lr, args.precision, augment, out, wd=args.wd,
                                 label_smoothing=args.label_smoothing if task == 'class' else 0.,
                                 average=None if args.average == 'none' else args.average,
                                 ema_decay=args.ema_decay, targets=t)
    print(f'Data: {args.data} ({task}; {n} training and {len(dls.valid.x)} validation images, '
          f'{c}x{"x".join(map(str, hw))}' + (f', {len(t.classes)} labels' if task == 'multilabel' else '') + ')')  # pyright: ignore[reportArgumentType]  (multi-label Targets have classes)
    print(f'Model: {args.model if model_args else type(net).__name__}; precision: {chosen}; batch {args.bs}, '
          f'{args.epochs} epochs, one-cycle AdamW at lr {args.lr}; loss {t.loss.__name__}', flush=True)
    record_run(out, model_args or {'name': type(net).__name__}, dls, dict(data=str(Path(args.data).resolve()),
                                                                          task=task, seed=args.seed))
    learn.fit(args.epochs, resume=args.resume)
    last = [r for r in learn.metrics.history if r['train'] == 'eval'][-1]
    res = {'task': task, 'data': str(args.data), 'epochs': args.epochs, 'bs': args.bs, 'lr': args.lr,
           'seed': args.seed, **{k: last[k] for k in [*t.metrics(), 'loss']}, 'monitor': t.monitor}
    learn.save(out / 'final.ckpt')
    plot_run(learn, out)
    learn.show_results(max_n=6)
    with atomic_path(out / 'results.png') as tmp: plt.savefig(tmp, dpi=80, bbox_inches='tight')
    plt.close('all')
    write_atomic(out / 'result.json', json.dumps(res, indent=2) + '\n')
    print('\nValidation ' + ', '.join(f'{k} {last[k]:.4f}' for k in t.metrics()), file=sys.stdout)
    print(f'Saved in {out}/: ' + ', '.join(sorted(p.name for p in out.iterdir())))
    return res
