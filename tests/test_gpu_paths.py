"""GPU code paths that a CPU can prove (issue 19): what moves, which precision, which scaler, which device.

A dtype move (`model.to(torch.float64)`) stands in for a device move, since `Module.to` swaps parameter data the same
way; an fp16 loss scaler on the CPU stands in for CUDA's, the same class with the same arithmetic; torch.cuda's
answers are replaced where the question is which GPU."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import miniai.engines.plan as plan_mod
import miniai.engines.precision as precision
from miniai.accel import MixedPrecision, fastest_settings
from miniai.core.events import Callback, CancelFitException
from miniai.runs.checkpoint import SaveModelCB
from miniai.runs.ckptfile import read_checkpoint
from miniai.datasets import DataLoaders
from miniai.learner import Learner, MetricsCB, TrainCB, TrainLearner
from miniai.callbacks.tricks import GradClipCB


def data(n=64, bs=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 5, generator=g, dtype=dtype), torch.randint(0, 3, (n,), generator=g)
    dl = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    return DataLoaders(dl, dl)


def model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)


class MoveCB(Callback):
    "Where DeviceCB moves the model to a GPU when the fit starts, this moves it to float32 (and each batch with it)."
    def before_fit(self, learn): learn.model.to(torch.float32)
    def before_batch(self, learn): learn.batch = (learn.batch[0].float(), learn.batch[1])


class StopAfter(Callback):
    order = 30  # after SaveModelCB has written the epoch's checkpoint
    def __init__(self, epoch): self.epoch = epoch
    def after_epoch(self, learn):
        if not learn.training and learn.epoch == self.epoch: raise CancelFitException()


# -- 1. resuming without a scheduler: the optimizer state follows the parameters that moved after loading -------------
def test_resumed_optimizer_state_follows_a_model_moved_after_loading(tmp_path):
    "Saved from a float32 run, resumed into a float64 model that MoveCB turns float32 after ResumeCB loaded the state."
    def learner(): return TrainLearner(model(dtype=torch.float64), data(dtype=torch.float64), F.cross_entropy, lr=1e-2,
                                       opt_func=optim.AdamW, cbs=[MoveCB(), SaveModelCB(tmp_path, every_epoch=True, save_best=False)])
    full = learner()
    full.fit(3)
    cut = learner()
    cut.fit(3, cbs=[StopAfter(0)])
    assert read_checkpoint(tmp_path / 'last.ckpt')['epoch'] == 0
    resumed = learner()
    resumed.fit(3, resume=tmp_path / 'last.ckpt')
    for p in resumed.model.parameters():
        assert all(v.dtype == p.dtype and v.device == p.device for k, v in resumed.opt.state[p].items() if k != 'step')
    assert all(torch.equal(a, b) for a, b in zip(full.model.parameters(), resumed.model.parameters()))


# -- 2. gradient clipping under fp16 loss scaling ----------------------------------------------------------------------
@pytest.fixture
def cpu_loss_scaling(monkeypatch):
    """MixedPrecision(fp16) on the CPU scales the loss as it does on CUDA: a GradScaler('cpu') in place of 'cuda'
    (fp16 on a CPU is slow, and says so once: here it stands in for a GPU's)."""
    monkeypatch.setattr(precision, '_needs_loss_scaling', lambda device_type, dtype: dtype == torch.float16)
    monkeypatch.setattr(precision, 'warn_fp16_on_cpu', lambda: None)


def step_sizes(cbs, fits=2):
    "How far one SGD step moved the weights, in each of `fits` fits of one batch each."
    learn, sizes = Learner(model(), data(n=16), F.cross_entropy, lr=0.5, cbs=cbs), []
    for _ in range(fits):
        before = [p.detach().clone() for p in learn.model.parameters()]
        learn.fit(1, valid=False)
        sizes.append(sum((p - b).norm() ** 2 for p, b in zip(learn.model.parameters(), before)).sqrt().item())
    return sizes


def test_grad_clip_unscales_fp16_gradients_of_every_fit(cpu_loss_scaling):
    plain = step_sizes([TrainCB(), GradClipCB(0.1)])
    mp = MixedPrecision(torch.float16)
    scaled = step_sizes([mp, GradClipCB(0.1)])
    assert mp.scaler is not None and mp.scaler.get_scale() == 65536.0, 'the fp16 scaler was in use'
    # still scaled when clipped, a step would be about 1/65536 of its size; unscaled twice, the clip would not bind
    assert scaled == pytest.approx(plain, rel=0.02)


def test_grad_clip_asks_accelerate_to_unscale(monkeypatch):
    pytest.importorskip('accelerate')
    from miniai.accel import AccelerateCB
    cb = AccelerateCB(mixed_precision='no')
    asked = []
    monkeypatch.setattr(cb.acc, 'unscale_gradients', lambda opt=None: asked.append(opt))
    learn = Learner(model(), data(n=16), F.cross_entropy, lr=0.1, cbs=[cb, GradClipCB(1.0)])
    learn.fit(1, valid=False)
    assert len(asked) == 1 and asked[0] is not None


# -- 3. a reused MixedPrecision keeps the saved loss scale on resume ----------------------------------------------------
def test_reused_mixed_precision_resumes_with_the_saved_loss_scale(tmp_path, cpu_loss_scaling):
    mp = MixedPrecision(torch.float16)
    learn = Learner(model(), data(), F.cross_entropy, lr=0.1, cbs=[mp])
    learn.fit(1)  # the callback now holds this fit's scaler
    mp.scaler.update(1234.0)
    learn.save(tmp_path / 'a.ckpt')
    assert read_checkpoint(tmp_path / 'a.ckpt')['callbacks']['MixedPrecision']['scaler']['scale'] == 1234.0
    seen = []
    class Scale(Callback):
        order = 20
        def before_batch(self, learn): seen.append(mp.scaler.get_scale())
    learn.fit(2, resume=tmp_path / 'a.ckpt', cbs=[Scale()])
    assert seen[0] == 1234.0
    seen.clear()
    learn.fit(1, cbs=[Scale()])  # a fresh fit, not a resume: a fresh scaler
    assert seen[0] == 65536.0


# -- 5. MetricsCB's flush makes no tensor from host data (a blocking copy to a GPU) -----------------------------------
class WatchedMetrics(MetricsCB):
    "MetricsCB whose per-batch work may not build a tensor from Python data on a device: on a GPU, a blocking copy."
    def after_batch(self, learn):
        real = {n: getattr(torch, n) for n in ('tensor', 'as_tensor')}
        def refuse(name):
            def make(data, *args, device=None, **kw):
                if device is not None: raise AssertionError(f'torch.{name}({data!r}, device={device}) in after_batch')
                return real[name](data, *args, **kw)
            return make
        try:
            for n in real: setattr(torch, n, refuse(n))
            super().after_batch(learn)
        finally:
            for n, f in real.items(): setattr(torch, n, f)


def test_metrics_flush_mid_epoch_without_a_host_copy_and_weighs_the_short_batch():
    dls = data(n=130, bs=4)  # 33 batches, the last of 2 items: the default flush_every=32 flushes mid-epoch
    metrics = WatchedMetrics()
    learn = TrainLearner(model(), dls, F.cross_entropy, lr=0.0, cbs=[metrics])
    learn.fit(1, train=False)
    x, y = torch.cat([b[0] for b in dls.valid]), torch.cat([b[1] for b in dls.valid])
    with torch.no_grad(): want = F.cross_entropy(learn.model(x), y).item()  # the mean over items, not over batches
    assert metrics.history[-1]['loss'] == pytest.approx(want, rel=1e-6)


def test_metrics_move_to_the_models_device_before_the_epoch_never_inside_a_batch(monkeypatch):
    """Issue 29, item 2: torcheval's `Metric.to` copies every state from the host, a blocking copy on a GPU. It used to
    run at the first flush, inside `after_batch`; now before the epoch, where `reset` runs, and not again."""
    from torcheval.metrics import Metric, MulticlassAccuracy
    moves, where = [], {'batch': False}
    real_to = Metric.to
    monkeypatch.setattr(Metric, 'to', lambda m, *a, **k: moves.append((type(m).__name__, where['batch'])) or
                        real_to(m, *a, **k))
    class Where(Callback):
        order = -100
        def before_batch(self, learn): where['batch'] = True
        def cleanup_batch(self, learn): where['batch'] = False
    learn = TrainLearner(model(), data(n=130, bs=4), F.cross_entropy, lr=0.1,
                         cbs=[MetricsCB(MulticlassAccuracy(), flush_every=8), Where()])
    learn.fit(2)
    assert moves and not any(inside for _, inside in moves), moves
    assert sorted({name for name, _ in moves}) == ['Mean', 'MulticlassAccuracy'] and len(moves) == 2, moves


# -- 6. bf16 only where the GPU in question does it in hardware (compute capability 8.0+) -----------------------------
@pytest.fixture
def two_gpus(monkeypatch):
    "cuda:0 an A100 (8.0), cuda:1 a T4 (7.5); torch's bf16 check says True for both, as it does when it counts emulation."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: True)
    def capability(d=None):
        idx = 0 if d is None else d if isinstance(d, int) else torch.device(d).index or 0
        return {0: (8, 0), 1: (7, 5)}[idx]
    monkeypatch.setattr(torch.cuda, 'get_device_capability', capability)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)


def test_bf16_is_chosen_by_the_capability_of_the_gpu_in_question(two_gpus, monkeypatch):
    assert fastest_settings('cuda:0')[0] == 'bf16-cl'
    assert fastest_settings('cuda:1') == ('fp16', 'CUDA GPU without bf16 in hardware (compute capability < 8.0): fp16 '
                                                  'autocast with loss scaling')
    assert plan_mod.fastest_plan('cuda:1').precision == 'fp16'
    chosen = {}
    for idx in (0, 1):
        monkeypatch.setattr(precision, 'model_device', lambda m: torch.device('cuda', idx))
        monkeypatch.setattr(torch.amp, 'GradScaler', lambda device: f'scaler for {device}')  # none on this machine
        mp = MixedPrecision()
        mp.before_fit(Learner(model(), data()))
        chosen[idx] = (mp.dtype, mp.scaler)
    assert chosen == {0: (torch.bfloat16, None), 1: (torch.float16, 'scaler for cuda')}


# -- 7. a GPU per process through CUDA_VISIBLE_DEVICES, told apart from too few GPUs under torchrun ---------------------
@pytest.fixture
def ranks_on_one_visible_gpu(monkeypatch):
    "Rank 1 of 2 on this machine, seeing one GPU; returns the devices made current."
    for k, v in dict(LOCAL_RANK=1, RANK=1, LOCAL_WORLD_SIZE=2, WORLD_SIZE=2).items(): monkeypatch.setenv(k, str(v))
    for k in ('MINIAI_DEVICE', 'TORCHELASTIC_RUN_ID'): monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, 'set_device', lambda d: chosen.append(d))
    return chosen


def test_a_process_shown_its_own_gpu_uses_it(ranks_on_one_visible_gpu, monkeypatch):
    "Slurm's srun --gpus-per-task=1 (or one GPU per container): each process sees one GPU, its own, as cuda:0."
    from miniai.conv import default_device, resolve_device
    from miniai.learner import DeviceCB
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '3')
    assert default_device() == resolve_device('cuda') == DeviceCB().device == 'cuda:0'
    assert ranks_on_one_visible_gpu and set(ranks_on_one_visible_gpu) == {0}


def test_torchrun_processes_sharing_one_gpu_are_still_refused(ranks_on_one_visible_gpu, monkeypatch):
    "torchrun's processes all see the same GPUs: two of them and one GPU is one GPU for two NCCL ranks."
    from miniai.conv import default_device
    monkeypatch.setenv('TORCHELASTIC_RUN_ID', 'job1')
    with pytest.raises(RuntimeError, match=r'2 processes on this machine .* only 1 CUDA GPU.* MINIAI_DEVICE=cuda:0'):
        default_device()
    assert ranks_on_one_visible_gpu == []


# -- 7. results leave the device as they come (issue 29, item 7) -------------------------------------------------------
def test_get_preds_hands_each_batch_to_the_cpu_as_it_comes(monkeypatch):
    """A model on 'meta' stands in for one on a GPU: every batch's predictions, targets and inputs are handed to the CPU
    during their batch (a stand-in copy of their shape, since meta holds no values), and nothing keeps the device's
    tensors after it, so what is held on the device stays one batch deep."""
    import gc
    import weakref
    from miniai.core.devices import HostCopies
    from miniai.learner import DeviceCB
    handed, waited = [], []
    def copy(self, t):
        handed.append((t.device.type, weakref.ref(t)))
        return torch.zeros(t.shape, dtype=t.dtype)
    monkeypatch.setattr(HostCopies, 'copy', copy)
    monkeypatch.setattr(HostCopies, 'wait', lambda self: waited.append(len(handed)))
    learn = Learner(model(), data(n=64, bs=16), F.cross_entropy, cbs=[TrainCB(), DeviceCB('meta')])
    preds, targs, inps = learn.get_preds(with_input=True)
    gc.collect()
    assert preds.shape == (64, 3) and targs.shape == (64,) and inps.shape == (64, 5)
    assert {p.device.type for p in (preds, targs, inps)} == {'cpu'}
    assert sorted({dev for dev, _ in handed}) == ['meta'] and len(handed) == 3 * 4, 'preds, targets, inputs of 4 batches'
    alive = [r() is not None for _, r in handed]
    assert alive[:-3] == [False] * 9, 'no earlier batch kept on the device (the Learner still holds the last one)'
    assert waited == [12], 'one wait, at the end'


def test_export_copies_the_model_to_the_cpu_without_a_second_copy_where_it_is(tmp_path, monkeypatch):
    "`copy.deepcopy(model).cpu()` duplicated every parameter on the GPU first; `cpu_copy` copies each straight over."
    from miniai.core.devices import cpu_copy
    m = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    copies = []
    real = torch.Tensor.__deepcopy__
    monkeypatch.setattr(torch.Tensor, '__deepcopy__', lambda t, memo: copies.append(t.shape) or real(t, memo))
    c = cpu_copy(m.to(torch.float64))  # float64 stands in for the device, as elsewhere in this file
    assert copies == [], 'no tensor deep-copied where it is'
    assert all(p.device.type == 'cpu' and isinstance(p, nn.Parameter) for p in c.parameters())
    sd, got = m.state_dict(), c.state_dict()
    assert sd.keys() == got.keys() and all(torch.equal(sd[k], got[k]) and sd[k].data_ptr() != got[k].data_ptr()
                                           for k in sd)
    assert next(m.parameters()).dtype == torch.float64 and m.training == c.training, 'the model itself is unchanged'
