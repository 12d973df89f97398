"""The fast.ai course's miniai is this library's first client: every name its modules export (`__all__`, module by
module, as in fastai/course22p2's miniai/) must exist here, under the same module, exported by `import *`, as the same
kind of thing (class, function, value), taking the course's parameters in the course's order. A rename, a removal or
a reordered signature fails here. Where this library deliberately differs, `DIFFERENCES` says so and why."""
import importlib
import inspect
from pathlib import Path

import pytest
import torch

from miniai.learner import Learner

CLS, FN, VAL = 'class', 'function', 'value'

#: module -> {name: (kind, the course's parameters in order, or None where not callable)}
#: the parameters are those of the function, or of the class's constructor (without self); '*x'/'**x' are var-args
COURSE = {
    'training': {
        'accuracy': (FN, ['out', 'yb']),
        'report': (FN, ['loss', 'preds', 'yb']),
        'Dataset': (CLS, ['x', 'y']),
        'fit': (FN, ['epochs', 'model', 'loss_func', 'opt', 'train_dl', 'valid_dl']),
        'get_dls': (FN, ['train_ds', 'valid_ds', 'bs', '**kwargs']),
    },
    'datasets': {
        'inplace': (FN, ['f']),
        'collate_dict': (FN, ['ds']),
        'show_image': (FN, ['im', 'ax', 'figsize', 'title', 'noframe']),
        'subplots': (FN, ['nrows', 'ncols', 'figsize', 'imsize', 'suptitle']),
        'get_grid': (FN, ['n', 'nrows', 'ncols', 'title', 'weight', 'size']),
        'show_images': (FN, ['ims', 'nrows', 'ncols', 'titles']),
        'DataLoaders': (CLS, ['*dls']),
    },
    'conv': {
        'def_device': (VAL, None),
        'conv': (FN, ['ni', 'nf', 'ks', 'stride', 'act']),
        'to_device': (FN, ['x', 'device']),
        'collate_device': (FN, ['b']),
    },
    'learner': {
        'CancelFitException': (CLS, None),
        'CancelBatchException': (CLS, None),
        'CancelEpochException': (CLS, None),
        'Callback': (CLS, None),
        'run_cbs': (FN, ['cbs', 'method_nm', 'learn']),
        'SingleBatchCB': (CLS, []),
        'to_cpu': (FN, ['x']),
        'MetricsCB': (CLS, ['*ms', '**metrics']),
        'DeviceCB': (CLS, ['device']),
        'TrainCB': (CLS, ['n_inp']),
        'ProgressCB': (CLS, ['plot']),
        'with_cbs': (CLS, ['nm']),
        'Learner': (CLS, ['model', 'dls', 'loss_func', 'lr', 'cbs', 'opt_func']),
        'TrainLearner': (CLS, ['model', 'dls', 'loss_func', 'lr', 'cbs', 'opt_func']),
        'MomentumLearner': (CLS, ['model', 'dls', 'loss_func', 'lr', 'cbs', 'opt_func', 'mom']),
        'LRFinderCB': (CLS, ['gamma', 'max_mult']),
        'lr_find': (FN, ['self', 'gamma', 'max_mult', 'start_lr', 'max_epochs']),
    },
    'activations': {
        'set_seed': (FN, ['seed', 'deterministic']),
        'Hook': (CLS, ['m', 'f']),
        'Hooks': (CLS, ['ms', 'f']),
        'HooksCallback': (CLS, ['hookfunc', 'mod_filter', 'on_train', 'on_valid', 'mods']),
        'append_stats': (FN, ['hook', 'mod', 'inp', 'outp']),
        'get_hist': (FN, ['h']),
        'get_min': (FN, ['h']),
        'ActivationStats': (CLS, ['mod_filter']),
    },
    'init': {
        'clean_ipython_hist': (FN, []),
        'clean_tb': (FN, []),
        'clean_mem': (FN, []),
        'BatchTransformCB': (CLS, ['tfm', 'on_train', 'on_val']),
        'GeneralRelu': (CLS, ['leak', 'sub', 'maxv']),
        'plot_func': (FN, ['f', 'start', 'end', 'steps']),
        'init_weights': (FN, ['m', 'leaky']),
        'lsuv_init': (FN, ['model', 'm', 'm_in', 'xb']),
        'conv': (FN, ['ni', 'nf', 'ks', 'stride', 'act', 'norm', 'bias']),
        'get_model': (FN, ['act', 'nfs', 'norm']),
    },
    'sgd': {
        'BaseSchedCB': (CLS, ['sched']),
        'BatchSchedCB': (CLS, ['sched']),
        'HasLearnCB': (CLS, []),
        'RecorderCB': (CLS, ['**d']),
        'EpochSchedCB': (CLS, ['sched']),
    },
    'resnet': {
        'act_gr': (FN, None),  # functools.partial(GeneralRelu, leak=0.1, sub=0.4)
        'ResBlock': (CLS, ['ni', 'nf', 'stride', 'ks', 'act', 'norm']),
    },
    'augment': {
        'summary': (FN, ['self']),
        'show_image_batch': (FN, ['self', 'max_n', 'cbs']),
        'CapturePreds': (CLS, []),
        'capture_preds': (FN, ['self', 'cbs', 'inps']),
        'rand_erase': (FN, ['x', 'pct', 'max_num']),
        'RandErase': (CLS, ['pct', 'max_num']),
        'rand_copy': (FN, ['x', 'pct', 'max_num']),
        'RandCopy': (CLS, ['pct', 'max_num']),
    },
    'accel': {
        'MixedPrecision': (CLS, ['n_inp']),  # the course's has no __init__ of its own: TrainCB's
        'AccelerateCB': (CLS, ['n_inp', 'mixed_precision']),
    },
    # the two modules the course's later lessons import themselves (its imports module does not)
    'fid': {
        'ImageEval': (CLS, ['model', 'dls', 'cbs']),
    },
    'diffusion': {
        'abar': (FN, ['t']),
        'inv_abar': (FN, ['x']),
        'noisify': (FN, ['x0']),
        'collate_ddpm': (FN, ['b']),  # the course's read the image key from a notebook global; here `xl=`
        'dl_ddpm': (FN, ['ds']),  # and the batch size too; here `bs=`
        'timestep_embedding': (FN, ['tsteps', 'emb_dim', 'max_period']),
        'pre_conv': (FN, ['ni', 'nf', 'ks', 'stride', 'act', 'norm', 'bias']),
        'upsample': (FN, ['nf']),
        'lin': (FN, ['ni', 'nf', 'act', 'norm', 'bias']),
        'SelfAttention': (CLS, ['ni', 'attn_chans', 'transpose']),
        'SelfAttention2D': (CLS, ['ni', 'attn_chans', 'transpose']),
        'EmbResBlock': (CLS, ['n_emb', 'ni', 'nf', 'ks', 'act', 'norm', 'attn_chans']),
        'saved': (FN, ['m', 'blk']),
        'DownBlock': (CLS, ['n_emb', 'ni', 'nf', 'add_down', 'num_layers', 'attn_chans']),
        'UpBlock': (CLS, ['n_emb', 'ni', 'prev_nf', 'nf', 'add_up', 'num_layers', 'attn_chans']),
        'EmbUNetModel': (CLS, ['in_channels', 'out_channels', 'nfs', 'num_layers', 'attn_chans', 'attn_start']),
        'ddim_step': (FN, ['x_t', 'noise', 'abar_t', 'abar_t1', 'bbar_t', 'bbar_t1', 'eta', 'sig', 'clamp']),
        'sample': (FN, ['f', 'model', 'sz', 'steps', 'eta', 'clamp']),
        'cond_sample': (FN, ['c', 'f', 'model', 'sz', 'steps', 'eta']),
    },
}

#: (module, helper) -> its exact parameters: not exported by `import *` (private names), but the course's notebooks
#: call them from the module (`from miniai.fid import _calc_fid`)
COURSE_HELPERS = {
    ('fid', '_calc_stats'): ['feats'],
    ('fid', '_calc_fid'): ['m1', 'c1', 'm2', 'c2'],
    ('fid', '_squared_mmd'): ['x', 'y'],
    ('fid', '_calc_kid'): ['x', 'y', 'maxs'],
    ('fid', '_sqrtm_newton_schulz'): ['mat', 'num_iters'],
}

#: the course's default values, where its code relies on them
COURSE_DEFAULTS = {
    ('fid', '_calc_kid'): {'maxs': 50},
    ('fid', '_sqrtm_newton_schulz'): {'num_iters': 100},
    ('fid', 'ImageEval'): {'cbs': None},
    ('diffusion', 'timestep_embedding'): {'max_period': 10000},
    ('diffusion', 'pre_conv'): {'ks': 3, 'stride': 1, 'act': torch.nn.SiLU, 'norm': None, 'bias': True},
    ('diffusion', 'lin'): {'act': torch.nn.SiLU, 'norm': None, 'bias': True},
    ('diffusion', 'SelfAttention'): {'transpose': True},
    ('diffusion', 'EmbResBlock'): {'nf': None, 'ks': 3, 'act': torch.nn.SiLU, 'norm': torch.nn.BatchNorm2d,
                                   'attn_chans': 0},
    ('diffusion', 'DownBlock'): {'add_down': True, 'num_layers': 1, 'attn_chans': 0},
    ('diffusion', 'UpBlock'): {'add_up': True, 'num_layers': 2, 'attn_chans': 0},
    ('diffusion', 'EmbUNetModel'): {'in_channels': 3, 'out_channels': 3, 'nfs': (224, 448, 672, 896),
                                    'num_layers': 1, 'attn_chans': 8, 'attn_start': 1},
    ('diffusion', 'ddim_step'): {'clamp': True},
    ('diffusion', 'sample'): {'eta': 1., 'clamp': True},
    ('diffusion', 'cond_sample'): {'eta': 1.},
}

#: methods the course patches onto Learner (`@fc.patch`), from the module that defines them
COURSE_LEARNER_METHODS = ['lr_find', 'summary', 'show_image_batch', 'capture_preds']

#: (module, name) -> why this library deliberately differs from the course there. Keep it short and true.
DIFFERENCES = {
    ('accel', 'MixedPrecision'): 'its first parameter is `dtype` (bf16 on CPUs, fp16 or bf16 on CUDA; the course\'s '
                                 'was fp16-only and took none); `n_inp` is still accepted by keyword',
}

CASES = [(m, n) for m, names in COURSE.items() for n in names]


def kind(obj) -> str:
    if inspect.isclass(obj): return CLS
    return FN if callable(obj) else VAL


def params(obj) -> list[str]:
    sig = inspect.signature(obj)
    prefix = {inspect.Parameter.VAR_POSITIONAL: '*', inspect.Parameter.VAR_KEYWORD: '**'}
    return [prefix.get(p.kind, '') + p.name for p in sig.parameters.values()]


def test_the_course_list_is_complete():
    "Ten modules, as the course's `imports` module star-imports them, then the two its later lessons import."
    assert list(COURSE) == ['training', 'datasets', 'conv', 'learner', 'activations', 'init', 'sgd', 'resnet',
                            'augment', 'accel', 'fid', 'diffusion']
    assert sum(map(len, COURSE.values())) == 88


@pytest.mark.parametrize('mod,name', CASES, ids=[f'{m}.{n}' for m, n in CASES])
def test_course_name_exists_and_is_exported(mod, name):
    m = importlib.import_module(f'miniai.{mod}')
    assert hasattr(m, name), f'miniai.{mod} lacks {name}, which the course exports from its miniai.{mod}'
    assert name in m.__all__, f'miniai.{mod}.{name} exists but is not in __all__, so `from miniai.{mod} import *` ' \
                              f'does not give it as the course does'


@pytest.mark.parametrize('mod,name', CASES, ids=[f'{m}.{n}' for m, n in CASES])
def test_course_name_is_the_same_kind_with_the_same_parameters(mod, name):
    want_kind, want_params = COURSE[mod][name]
    obj = getattr(importlib.import_module(f'miniai.{mod}'), name)
    assert kind(obj) == want_kind, f'miniai.{mod}.{name} is a {kind(obj)}; in the course it is a {want_kind}'
    if want_params is None: return
    if (mod, name) in DIFFERENCES:
        assert all(p in params(obj) for p in want_params), f'{mod}.{name}: {DIFFERENCES[(mod, name)]}'
        return
    have = params(obj)
    named = [p for p in want_params if not p.startswith('*')]
    assert [p for p in have if not p.startswith('*')][:len(named)] == named, \
        f'miniai.{mod}.{name}{inspect.signature(obj)} does not start with the course\'s parameters {want_params}'
    for var in (p for p in want_params if p.startswith('*')):
        stars = var[:2] if var.startswith('**') else var[:1]
        assert any(p.startswith(stars) and (stars == '**' or not p.startswith('**')) for p in have), \
            f'miniai.{mod}.{name} does not take {var} as the course does'


def test_values_and_specific_objects():
    from miniai.conv import def_device
    from miniai.init import GeneralRelu
    from miniai.resnet import act_gr
    torch.device(def_device)  # a device name or object, usable in .to(def_device) and DeviceCB(device=...)
    for exc in ('CancelFitException', 'CancelBatchException', 'CancelEpochException'):
        assert issubclass(getattr(importlib.import_module('miniai.learner'), exc), Exception)
    act = act_gr()
    assert isinstance(act, GeneralRelu) and (act.leak, act.sub) == (0.1, 0.4)


@pytest.mark.parametrize('mod,name', list(COURSE_HELPERS), ids=[f'{m}.{n}' for m, n in COURSE_HELPERS])
def test_course_helper_exists_with_the_course_parameters(mod, name):
    obj = getattr(importlib.import_module(f'miniai.{mod}'), name, None)
    assert callable(obj), f'miniai.{mod} lacks {name}, which the course\'s notebooks call'
    assert params(obj) == COURSE_HELPERS[(mod, name)], f'miniai.{mod}.{name}{inspect.signature(obj)}'


@pytest.mark.parametrize('mod,name', list(COURSE_DEFAULTS), ids=[f'{m}.{n}' for m, n in COURSE_DEFAULTS])
def test_course_defaults(mod, name):
    sig = inspect.signature(getattr(importlib.import_module(f'miniai.{mod}'), name))
    have = {k: sig.parameters[k].default for k in COURSE_DEFAULTS[(mod, name)]}
    assert have == COURSE_DEFAULTS[(mod, name)], f'miniai.{mod}.{name}{sig}'


@pytest.mark.parametrize('name', COURSE_LEARNER_METHODS)
def test_course_learner_methods(name):
    import miniai  # noqa: F401  (the package patches them all onto Learner)
    assert callable(getattr(Learner, name, None)), f'Learner.{name} is missing'


def test_augment_summary_is_the_learner_method():
    "The course's `summary` in miniai.augment is the patched Learner method: `summary(learn)` == `learn.summary()`."
    from miniai.augment import summary
    assert summary is Learner.summary


def test_differences_name_real_course_names():
    for mod, name in DIFFERENCES: assert name in COURSE[mod]


# -- from miniai.imports import * --------------------------------------------------------------------------------

def star(module: str) -> dict:
    ns = {}
    exec(f'from {module} import *', ns)
    return ns


def test_imports_gives_every_course_name_as_the_course_resolves_it():
    "Later star imports win, in the course's order (datasets ... accel, training): `conv` is init's, for one."
    ns = star('miniai.imports')
    order = ['datasets', 'conv', 'learner', 'activations', 'init', 'sgd', 'resnet', 'augment', 'accel', 'training']
    want = {}
    for mod in order:
        m = importlib.import_module(f'miniai.{mod}')
        want.update({n: getattr(m, n) for n in COURSE[mod]})
    wrong = [n for n, obj in want.items() if ns.get(n) is not obj]
    assert not wrong, f'from miniai.imports import * gives other objects than the course would for {wrong}'
    from miniai.init import conv
    assert ns['conv'] is conv and ns['summary'] is Learner.summary


def test_imports_gives_the_course_third_party_names():
    import datasets
    import fastcore.all
    import matplotlib
    import matplotlib.pyplot
    import numpy
    import torchvision.io
    import torchvision.transforms
    import torchvision.transforms.functional
    from fastcore.foundation import L
    ns = star('miniai.imports')
    want = {'torch': torch, 'nn': torch.nn, 'F': torch.nn.functional, 'optim': torch.optim, 'init': torch.nn.init,
            'tensor': torch.tensor, 'lr_scheduler': torch.optim.lr_scheduler, 'DataLoader': torch.utils.data.DataLoader,
            'default_collate': torch.utils.data.default_collate, 'fc': fastcore.all, 'L': L, 'np': numpy,
            'mpl': matplotlib, 'plt': matplotlib.pyplot, 'T': torchvision.transforms,
            'TF': torchvision.transforms.functional, 'read_image': torchvision.io.read_image,
            'ImageReadMode': torchvision.io.ImageReadMode, 'datasets': datasets,
            'load_dataset': datasets.load_dataset, 'Path': Path}
    wrong = [n for n, obj in want.items() if ns.get(n) is not obj]
    assert not wrong, wrong
    for n in ('math', 'random', 'partial', 'wraps', 'itemgetter', 'attrgetter'): assert n in ns


def test_imports_covers_every_library_module():
    "A new module must be added to miniai.imports (or left out there with its reason, like the command line)."
    import miniai.imports as mi
    pkg = Path(mi.__file__).parent
    rooms = {'.'.join(p.relative_to(pkg).with_suffix('').parts) for p in pkg.glob('*/*.py') if p.stem != '__init__'}
    assert rooms - {'app.cli'} == set(mi.LIBRARY_MODULES)
    fronts = {p.stem for p in pkg.glob('*.py')} - {'__init__', '__main__', '_moved', 'imports'}
    assert set(mi.COURSE_MODULES) == fronts - {'fid', 'diffusion'}, 'the ones the course star-imports, in its order'
    ns = star('miniai.imports')
    for mod in sorted(rooms - {'app.cli'} | fronts):
        missing = [n for n in importlib.import_module(f'miniai.{mod}').__all__ if n not in ns]
        assert not missing, f'miniai.imports does not give miniai.{mod}\'s {missing}'