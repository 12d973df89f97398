"""CompileCB: the loop, hooks, checkpoints, probes and the metrics table keep working with a compiled model.

Behaviour is checked with torch.compile's 'eager' and 'aot_eager' backends (dynamo traces and, for aot_eager,
AOTAutograd splits forward and backward, but no code is generated); one test compiles a tiny model with inductor.
"""
import fastcore.all as fc
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import precision_cbs
from miniai.activations import ActivationStats
from miniai.core.events import Callback, CancelFitException, EVENTS
from miniai.runs.checkpoint import SaveModelCB
from miniai.engines.compile import CompileCB, _copy_out
from miniai.datasets import DataLoaders
from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.learner import DeviceCB, MetricsCB, ProgressCB, TrainLearner

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


@pytest.fixture(autouse=True)
def fresh_dynamo():
    "Models of one architecture share compiled graphs: start each test with none, so each sees its own compiles."
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def cnn(width=8):
    return nn.Sequential(nn.Conv2d(1, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 10, 3, stride=2, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def synth_dls(n=80, bs=32, seed=0):
    "80 items in batches of 32: the last batch (16) is smaller, as in real epochs."
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    dl = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    return DataLoaders(dl, dl[:2])


def learner(model, cbs=(), dls=None):
    return TrainLearner(model, dls or synth_dls(), F.cross_entropy, lr=1e-2, opt_func=optim.AdamW, cbs=list(cbs))


class Compiled(Callback):
    "Records, at every batch, whether the model runs compiled."
    def __init__(self): self.seen = []
    def after_batch(self, learn): self.seen.append(learn.model._compiled_call_impl is not None)


def test_compiled_fit_trains_as_eager_does_and_leaves_a_plain_model():
    weights = {}
    for name, cbs in (('eager', []), ('compiled', [CompileCB(backend='aot_eager')])):
        torch.manual_seed(0)
        model, spy = cnn(), Compiled()
        learner(model, [*cbs, spy]).fit(2)
        weights[name] = model.state_dict()
        assert all(spy.seen) == (name == 'compiled') and len(spy.seen) == 2 * (3 + 2)
        assert model._compiled_call_impl is None, 'outside the fit the model is plain'
    assert list(weights['eager']) == list(weights['compiled']), 'state_dict keys stay plain (no _orig_mod.)'
    for k, v in weights['eager'].items():
        torch.testing.assert_close(weights['compiled'][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_bf16_autocast_and_channels_last_reach_the_compiled_model():
    losses = {}
    for name, cbs in (('eager', []), ('compiled', [CompileCB(backend='aot_eager')])):
        torch.manual_seed(0)
        metrics = MetricsCB()
        learner(cnn(), [metrics, *cbs, *precision_cbs('bf16-cl')]).fit(2)
        losses[name] = [r['loss'] for r in metrics.history]
    assert losses['eager'] == pytest.approx(losses['compiled'], rel=0.05), losses


def test_every_event_still_runs_in_order():
    class Recorder(Callback):
        order = 50
        def __init__(self): self.events = []
    for ev in EVENTS: setattr(Recorder, ev, lambda self, learn, _e=ev: self.events.append(_e))
    runs = []
    for cbs in ([], [CompileCB(backend='eager')]):
        rec = Recorder()
        learner(cnn(), [*cbs, rec]).fit(2)
        runs.append(rec.events)
    assert runs[0] == runs[1] and len(runs[0]) > 40


def test_the_compiling_epoch_is_marked_in_the_table_and_recorded(capsys):
    cc = CompileCB(backend='eager')
    learn = learner(cnn(), [MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB(), cc])
    learn.fit(2)
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and lines[0].split() == ['accuracy', 'loss', 'epoch', 'train', 'time']
    assert '(compiling' in lines[1] and '(compiling' in lines[2], 'epoch 0 compiles the train and the eval graphs'
    assert not any('compiling' in l for l in lines[3:])
    assert [(c['epoch'], c['train']) for c in cc.compiles] == [(0, 'train'), (0, 'eval')]
    assert all(c['graphs'] >= 1 and c['secs'] > 0 for c in cc.compiles) and cc.compile_secs > 0
    assert all(isinstance(r['time'], float) for r in learn.metrics.history), 'history keeps plain numbers'
    learn.fit(1)
    assert '(compiling' not in capsys.readouterr().out, 'a second fit reuses what the first compiled'
    assert len(cc.compiles) == 2
    assert not {'_log', 'compute', 'measured'} & set(vars(learn.metrics)), 'no callback rewrote MetricsCB\'s methods'


def test_hooks_added_between_compiled_fits_see_every_batch():
    model, cc = cnn(), CompileCB(backend='eager')
    learn = learner(model, [cc])
    learn.fit(1)  # compiles without hooks
    # without hook guards dynamo would keep running the graph it traced without them, and ActivationStats
    # would record nothing; with them, the hooked model recompiles once
    stats = ActivationStats(fc.risinstance(nn.ReLU))
    learn.fit(1, cbs=[stats])
    assert len(stats) == 1 and len(stats.hooks[0].stats[0]) == 3
    means = torch.stack(stats.hooks[0].stats[0])
    assert torch.isfinite(means).all() and (means > 0).all(), 'a ReLU output has a positive mean'
    assert all(not m._forward_hooks for m in model.modules())
    learn.fit(1)  # the removed hooks must not run again from the graph traced with them
    assert len(stats.hooks[0].stats[0]) == 3


def test_a_checkpoint_saved_while_compiled_loads_into_the_plain_model(tmp_path):
    torch.manual_seed(0)
    model = cnn()
    learner(model, [MetricsCB(), CompileCB(backend='eager'), SaveModelCB(tmp_path, every_epoch=True)]).fit(1)
    plain = learner(cnn())
    plain.load(tmp_path / 'last.ckpt')
    for (k, a), b in zip(plain.model.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), k


def test_probes_work_and_change_nothing():
    torch.manual_seed(0)
    learn = learner(cnn(), [CompileCB(backend='aot_eager')])
    learn.fit(1)
    plain = learner(cnn())
    plain.model.load_state_dict(learn.model.state_dict())
    s, s0 = learn.summary(), plain.summary()
    assert s.totals == s0.totals and s.totals['flops'] > 0
    preds, targs = learn.capture_preds()
    preds0, targs0 = plain.capture_preds()
    assert torch.equal(targs, targs0)
    torch.testing.assert_close(preds, preds0, rtol=1e-4, atol=1e-5)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    lr = learn.lr_find(max_epochs=3, plot=False)
    assert lr > 0 and all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_each_callback_has_its_own_recompile_limit():
    "Dynamo's shared limit of 8 would leave the 9th model eager, silently but for a log line."
    dl = [(torch.randn(4, 6), torch.randint(0, 2, (4,)))]
    for width in range(1, 11):
        cc = CompileCB(backend='eager')
        model = nn.Sequential(nn.Linear(6, width), nn.ReLU(), nn.Linear(width, 2))
        TrainLearner(model, DataLoaders(dl, dl), F.cross_entropy, cbs=[cc]).fit(1, valid=False)
        assert cc.compiles and cc.compiles[0]['graphs'] >= 1, width


def test_bad_modes_and_models_already_compiled_are_refused():
    with pytest.raises(ValueError, match="mode must be one of default, reduce-overhead.*'fast'"): CompileCB('fast')
    model = cnn()
    model.compile(backend='eager')
    with pytest.raises(ValueError, match=r'model\.compile\(\) was called'): learner(model, [CompileCB()]).fit(1)
    with pytest.raises(ValueError, match='OptimizedModule'):
        learner(torch.compile(cnn(), backend='eager'), [CompileCB()]).fit(1)


class Stop(Callback):
    "Ends the fit before the model is called: CompileCB has set up, nothing is compiled."
    def before_batch(self, learn): raise CancelFitException()


def test_reduce_overhead_on_a_cpu_model_compiles_as_default_with_a_warning():
    cc = CompileCB('reduce-overhead')
    with pytest.warns(UserWarning, match="need a CUDA model.*mode='default'"): learner(cnn(), [cc, Stop()]).fit(1)
    assert cc._key == 'default' and not cc.cuda_graphs


def pretend_cuda_graphs(monkeypatch):
    "The CUDA-graph rules, exercised on the CPU: CompileCB believes the model is on CUDA."
    def mode_for(self, model):
        self.cuda_graphs = True
        return self.mode
    monkeypatch.setattr(CompileCB, '_mode_for', mode_for)
    monkeypatch.setattr(torch.compiler, 'cudagraph_mark_step_begin', lambda: marks.append(1))
    marks = []
    return marks


def test_cuda_graphs_refuse_forward_hooks_naming_the_modules(monkeypatch):
    pretend_cuda_graphs(monkeypatch)
    with pytest.raises(RuntimeError, match=r"overwrite every tensor a forward hook keeps.*hooks are on 2\. Use"):
        learner(cnn(), [CompileCB('reduce-overhead', backend='eager'), ActivationStats(fc.risinstance(nn.ReLU))]).fit(1)


def test_cuda_graphs_start_a_step_per_batch_and_copy_the_predictions_out(monkeypatch):
    marks = pretend_cuda_graphs(monkeypatch)
    outs, kept = [], []
    class Spy(TrainLearner):
        def predict(self):
            super().predict()
            outs.append(self.preds)
    class Keep(Callback):
        order = 40
        def after_predict(self, learn): kept.append(learn.preds)
    Spy(cnn(), synth_dls(), F.cross_entropy, cbs=[CompileCB('reduce-overhead', backend='eager'), Keep()]).fit(1)
    assert len(marks) == 5 == len(kept)
    assert all(k is not o and torch.equal(k, o) for k, o in zip(kept, outs)), 'callbacks get a copy'
    x = (torch.ones(2, requires_grad=True), {'a': torch.zeros(1)}, 3)
    y = _copy_out(x)
    assert y[0] is not x[0] and y[0].requires_grad and torch.equal(y[1]['a'], x[1]['a']) and y[2] == 3


def fashion_accuracies(model_fn, cbs=(), device='cpu', **dls_kw) -> list[float]:
    "Accuracy after each stage (train, eval) of a 2-epoch fit on a Fashion-MNIST subset, from seed 0."
    torch.manual_seed(0)
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    dls = fashion_dls(seed=0, device=device, **dls_kw)
    TrainLearner(model_fn(), dls, F.cross_entropy, lr=1e-2, opt_func=optim.AdamW,
                 cbs=[DeviceCB(device), metrics, *cbs]).fit(2)
    return [r['accuracy'] for r in metrics.history]


@needs_data
def test_inductor_compiles_a_tiny_model_that_learns_like_eager():
    mlp = lambda: nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    cc = CompileCB()
    eager, compiled = (fashion_accuracies(mlp, cbs, bs=256, n_train=1024, n_valid=512) for cbs in ([], [cc]))
    assert [c['epoch'] for c in cc.compiles] == [0, 0]
    assert eager[-1] > 0.6 and compiled == pytest.approx(eager, abs=0.01)


@pytest.mark.cuda
def test_reduce_overhead_on_cuda_trains_like_eager_with_metrics_that_keep_predictions():
    "MetricsCB keeps 32 batches of predictions before reading them: a CUDA-graph replay must not overwrite them."
    cc = CompileCB('reduce-overhead')
    kw = dict(bs=128, n_train=128 * 40 + 50, n_valid=1000, device='cuda')  # 40 batches and a smaller last one
    eager, compiled = (fashion_accuracies(lambda: cnn(16), cbs, **kw) for cbs in ([], [cc]))
    assert cc.cuda_graphs and cc.compiles
    assert compiled == pytest.approx(eager, abs=0.02)


@pytest.mark.cuda
def test_reduce_overhead_on_cuda_refuses_activation_stats():
    dls = fashion_dls(bs=128, n_train=256, n_valid=128, seed=0, device='cuda')
    learn = TrainLearner(cnn(), dls, F.cross_entropy, cbs=[DeviceCB('cuda'), CompileCB('reduce-overhead'),
                                                           ActivationStats(fc.risinstance(nn.ReLU))])
    with pytest.raises(RuntimeError, match='forward hook'): learn.fit(1)
