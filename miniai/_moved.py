"""Where the flat modules of earlier versions went. Before the one-house layout miniai had its modules side by side
(`miniai.fashion`, `miniai.checkpoint`, `miniai.data`...); the course's module names are still the front door, and the
others are now in rooms (see ARCHITECTURE.md). So that code written for them keeps running, each old name still
imports, giving the same objects, with one FutureWarning per module naming where its names live now."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import os
import sys
import warnings

__all__ = ['MOVED', 'install_moved_modules', 'room_getattr']

#: old module (under miniai.) -> {name it exported: 'room.module' where it lives now, or 'room.module:new_name'}
MOVED = {
    'accelerator': {
        'AccelerateCB': 'engines.accelerate'},
    'autoresume': {
        'run_checkpoints': 'runs.autoresume', 'newest_checkpoint': 'runs.autoresume', 'choose_together':
        'runs.autoresume', 'AutoResumeCB': 'runs.autoresume'},
    'averaging': {
        'WeightAverageCB': 'callbacks.averaging'},
    'callback': {
        'CancelFitException': 'core.events', 'CancelBatchException': 'core.events', 'CancelEpochException':
        'core.events', 'Callback': 'core.events', 'EVENTS': 'core.events', 'STEPS': 'core.events', 'run_cbs':
        'core.events', 'with_cbs': 'core.events', 'misspelt_events': 'core.events', 'note_failure': 'core.events',
        'to_cpu': 'core.nested', 'callback_states': 'core.state', 'load_callback_states': 'core.state'},
    'checkpoint': {
        'CheckpointError': 'core.state', 'save_checkpoint': 'runs.checkpoint', 'read_checkpoint': 'runs.ckptfile',
        'rng_snapshot': 'runs.checkpoint', 'save_mid_epoch': 'runs.checkpoint', 'ResumeCB': 'runs.checkpoint',
        'SaveModelCB': 'runs.checkpoint', 'monitor_value': 'callbacks.metrics'},
    'checks': {
        'ModuleForwardError': 'core.checks', 'warn_user': 'core.messages', 'warn_once': 'core.messages',
        'takes_tuples': 'core.checks', 'shape_of': 'core.nested:first_shape', 'module_expects': 'core.checks',
        'forward_error': 'core.checks', 'failed_module': 'core.checks', 'device_mismatch': 'core.checks',
        'explain_forward_failure': 'core.checks', 'is_nll_loss': 'core.checks', 'is_classification_loss':
        'core.checks', 'loss_failure': 'core.checks', 'NamedBatchCB': 'core.checks', 'FirstBatchChecks':
        'core.checks'},
    'ckptfile': {
        'CheckpointError': 'core.state', 'FORMAT': 'runs.ckptfile', 'write_checkpoint': 'runs.ckptfile',
        'read_checkpoint': 'runs.ckptfile'},
    'cli': {
        'main': 'app.cli', 'build_parser': 'app.cli', 'train': 'app.cli'},
    'cluster': {
        'StopAgreement': 'engines.cluster', 'rank_state': 'engines.cluster', 'save_by_main': 'engines.cluster',
        'save_together': 'engines.cluster', 'this_rank': 'engines.cluster'},
    'compile': {
        'CompileCB': 'engines.compile', 'COMPILE_MODES': 'engines.compile'},
    'data': {
        'TensorDataLoader': 'data.loader', 'ImageDataError': 'data.decode', 'channel_stats': 'data.normalise',
        'subset': 'data.loader', 'cache_root': 'data.imagecache', 'ImageSet': 'data.imagecache', 'write_images':
        'data.imagecache', 'read_images': 'data.imagecache', 'image_dls': 'data.dataloaders'},
    'distributed': {
        'is_dist': 'core.ranks', 'rank': 'core.ranks', 'local_rank': 'core.ranks', 'world_size': 'core.ranks',
        'is_main_process': 'core.ranks', 'init_distributed': 'engines.ddp', 'end_distributed': 'engines.ddp',
        'default_backend': 'engines.ddp', 'cpu_group': 'engines.ddp', 'gather_to_main': 'engines.ddp', 'all_agree':
        'engines.ddp', 'DDPCB': 'engines.ddp'},
    'export': {
        'ExportError': 'tools.export', 'ExportedModel': 'tools.export', 'export': 'tools.export', 'load_exported':
        'tools.export', 'check_program': 'tools.export'},
    'fashion': {
        'CLASSES': 'data.fashion', 'DEBIAN_DIR': 'data.fashion', 'FILES': 'data.fashion', 'FashionMNISTNotFound':
        'data.fashion', 'IDXError': 'data.fashion', 'find_fashion_mnist': 'data.fashion', 'read_idx':
        'data.fashion', 'fashion_arrays': 'data.fashion', 'load_fashion_mnist': 'data.fashion', 'TensorDataLoader':
        'data.loader', 'fashion_dls': 'data.fashion'},
    'hf_images': {
        'is_image_dd': 'data.hf', 'dd_images': 'data.hf', 'dd_dls': 'data.dataloaders'},
    'images': {
        'IMAGE_SUFFIXES': 'data.decode', 'folder_images': 'data.folders', 'folder_dls': 'data.dataloaders',
        'png_bytes': 'data.decode', 'write_image_folder': 'data.folders'},
    'inference': {
        'Prediction': 'tools.inference', 'get_preds': 'tools.inference', 'predict': 'tools.inference',
        'per_item_loss': 'tools.inference', 'input_shape': 'tools.inference'},
    'interpret': {
        'ClassificationInterpretation': 'tools.interpret'},
    'interrupt': {
        'Interrupted': 'runs.interrupt', 'SignalGuard': 'runs.interrupt', 'InterruptCB': 'runs.interrupt',
        'DrillCB': 'runs.interrupt', 'drills_from_env': 'runs.interrupt', 'active_guard': 'runs.interrupt',
        'signal_name': 'runs.interrupt'},
    'loggers': {
        'CSVLoggerCB': 'callbacks.loggers', 'TensorBoardCB': 'callbacks.loggers'},
    'longrun': {
        'EarlyStoppingCB': 'callbacks.tricks', 'TerminateOnNaNCB': 'callbacks.tricks', 'GradClipCB':
        'callbacks.tricks', 'GradAccumCB': 'callbacks.tricks'},
    'lr_finder': {
        'LRFinderCB': 'callbacks.schedule', 'suggest_lr': 'callbacks.schedule'},
    'progress': {
        'MetricsCB': 'callbacks.metrics', 'ProgressCB': 'callbacks.progress', 'format_time': 'callbacks.metrics',
        'quiet_torcheval': 'callbacks.metrics', 'plots_show': 'callbacks.progress', 'show_or_save':
        'callbacks.progress'},
    'ranks': {
        'is_dist': 'core.ranks', 'rank': 'core.ranks', 'local_rank': 'core.ranks', 'local_world_size': 'core.ranks',
        'world_size': 'core.ranks', 'is_main_process': 'core.ranks'},
    'recipe': {
        'MODELS': 'app.recipe', 'AUGMENTS': 'app.recipe', 'augment_for': 'app.recipe', 'build_model': 'app.recipe',
        'augment_tfms': 'app.recipe', 'recipe_dls': 'app.recipe', 'make_learner': 'app.recipe', 'run_recipe':
        'app.recipe', 'plot_run': 'app.recipe'},
    'state': {
        'rng_state': 'core.state', 'set_rng_state': 'core.state', 'plain_keys': 'core.state', 'plain_state_dict':
        'core.state', 'keeps_state': 'core.state', 'loader_generator': 'core.state', 'note_epoch_start':
        'core.state', 'loader_state': 'core.state', 'set_loader_state': 'core.state', 'unchanged': 'core.state',
        'match_state_layout': 'core.state'},
    'summary': {
        'Summary': 'tools.summary', 'summary': 'tools.summary', 'ModuleForwardError': 'core.checks'},
    'timetoacc': {
        'TimeToAccuracyCB': 'callbacks.loggers'},
    'unet': {
        'timestep_embedding': 'models.unet', 'pre_conv': 'models.unet', 'upsample': 'models.unet', 'lin':
        'models.unet', 'SelfAttention': 'models.unet', 'SelfAttention2D': 'models.unet', 'EmbResBlock':
        'models.unet', 'saved': 'models.unet', 'DownBlock': 'models.unet', 'UpBlock': 'models.unet', 'EmbUNetModel':
        'models.unet'},
}

_PACKAGE = os.path.dirname(os.path.abspath(__file__))
_warned: set = set()


def _home(where: str):
    "The object `where` ('room.module' and the name, or 'room.module:new_name') names."
    mod, _, attr = where.partition(':')
    return importlib.import_module(f'{__package__}.{mod}'), attr


def _new_places(old: str) -> str:
    "The modules where the names of the old module `old` live now."
    return ', '.join(sorted({f'miniai.{w.partition(":")[0]}' for w in MOVED[old].values()}))


def _say(message: str) -> None:
    "A FutureWarning attributed to the user's line: the first frame outside miniai and the import machinery."
    f, level = sys._getframe(1), 2
    while f is not None:
        name = f.f_code.co_filename
        if 'importlib' in name and '_bootstrap' in name: f = f.f_back  # warnings does not count these frames
        elif name.startswith(_PACKAGE): f, level = f.f_back, level + 1
        else: break
    warnings.warn(message, FutureWarning, stacklevel=level)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    "Imports `miniai.<old>` as a module holding the names it had, taken from their new homes."
    def find_spec(self, fullname, path, target=None):
        pkg, _, old = fullname.rpartition('.')
        if pkg != __package__ or old not in MOVED or old == 'data': return None  # data is a room, with its own lookup
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec): return None  # a plain module

    def exec_module(self, module) -> None:
        old = module.__name__.rpartition('.')[2]
        _say(f'{module.__name__} has moved: its names are now in {_new_places(old)} (this old name still works, '
             f'for now)')
        for name, where in MOVED[old].items():
            mod, attr = _home(where)
            setattr(module, name, getattr(mod, attr or name))
        module.__all__ = list(MOVED[old])  # pyright: ignore[reportAttributeAccessIssue]  (any module may have one)


def install_moved_modules() -> None:
    "Let the old module names import (once per process)."
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path): sys.meta_path.append(_MovedModules())


def room_getattr(room: str):
    "A module `__getattr__` for the room `room` that gives the names its old module of the same name had."
    old = room.rpartition('.')[2]

    def __getattr__(name: str):
        where = MOVED.get(old, {}).get(name)
        if where is None: raise AttributeError(f'module {room!r} has no attribute {name!r}')
        mod, attr = _home(where)
        if (old, name) not in _warned:
            _warned.add((old, name))
            _say(f'{room}.{name} has moved: import it from {mod.__name__}')
        return getattr(mod, attr or name)
    return __getattr__
