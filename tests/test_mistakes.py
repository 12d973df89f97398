"""The mistakes everyone makes in the first hour get one clear message, early: the model's output width, nll_loss on
raw outputs, fp16 on a CPU, a schedule shorter than the fit, a shape error inside the model, a model and batch on
different devices, dict batches. And the checks cost the loop nothing after the first batch."""
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

import miniai.core.checks as checks
import miniai.core.messages as messages
from miniai.accel import MixedPrecision, precision_cbs
from miniai.core.events import Callback
from miniai.core.checks import ModuleForwardError
from miniai.datasets import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.learner import DeviceCB, Learner, MetricsCB, NamedBatchCB, TrainCB, TrainLearner
from miniai.sgd import BatchSchedCB, EpochSchedCB


def synth_dls(n_train=64, n_valid=32, bs=16, n_classes=10, classes=True):
    g = torch.Generator().manual_seed(0)
    n = n_train + n_valid
    x, y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, n_classes, (n,), generator=g)
    y[0] = n_classes - 1  # the largest class is in the first batch
    dls = DataLoaders(TensorDataLoader(x[:n_train], y[:n_train], bs), TensorDataLoader(x[n_train:], y[n_train:], bs))
    if classes: dls.classes = [f'c{i}' for i in range(n_classes)]
    return dls


def cnn(n_in=1, n_out=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(n_in, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, n_out))


class CountBatches(Callback):
    def __init__(self): self.n = 0
    def after_batch(self, learn): self.n += 1


@pytest.fixture(autouse=True)
def fresh_once_registry(monkeypatch):
    "Messages said once a process are said again in each test."
    monkeypatch.setattr(messages, '_warned', set())


# -- the model's output width ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('n_out', [12, 8])
def test_output_width_against_the_classes_the_data_has(n_out):
    count = CountBatches()
    learn = TrainLearner(cnn(n_out=n_out), synth_dls(), F.cross_entropy, cbs=[count])
    with pytest.raises(ValueError) as info: learn.fit(1)
    assert str(info.value) == (f'the model outputs {n_out} values per item, but the data has 10 classes '
                               f'(dls.classes): make its last layer output 10')
    assert count.n == 0, 'refused at the first batch, before anything trained'


def test_too_few_outputs_against_the_largest_target_when_the_data_has_no_class_names():
    learn = TrainLearner(cnn(n_out=8), synth_dls(classes=False), F.cross_entropy)
    with pytest.raises(ValueError, match=r'^the model outputs 8 values per item, but the first batch has target 9: '
                                         r'it needs at least 10 outputs \(one per class\)$'): learn.fit(1)


def test_too_few_outputs_are_refused_before_the_loss_off_the_cpu_too(monkeypatch):
    """Issue 29, item 4: on a GPU an out-of-range target makes `cross_entropy` fail with a device-side assert, which
    leaves the CUDA context unusable; the check that exists to prevent it must run before the loss. A GPU stand-in
    (values not read at once) and a loss that records whether it ran: the check's message, and no loss."""
    monkeypatch.setattr(checks, '_reads_now', lambda device: False)
    calls = []
    def loss(preds, y):
        calls.append(len(y))
        return F.cross_entropy(preds, y)
    loss.__name__ = 'cross_entropy'  # still a classification loss, as the check knows it
    monkeypatch.setattr(checks, 'is_classification_loss', lambda f: True)
    learn = TrainLearner(cnn(n_out=8), synth_dls(classes=False), loss)
    with pytest.raises(ValueError, match=r'^the model outputs 8 values per item, but the first batch has target 9'):
        learn.fit(1)
    assert calls == [], 'refused before the loss ran'


def test_too_many_outputs_against_the_largest_target_is_warned_when_the_batch_is_big_enough():
    dls = synth_dls(n_train=256, bs=128, classes=False)  # 128 items: at least ten a class for 12 outputs
    learn = TrainLearner(cnn(n_out=12), dls, F.cross_entropy)
    with pytest.warns(UserWarning, match=r'the model outputs 12 values per item, but the largest target in the first '
                                         r'batch of 128 is 9: if there are 10 classes, make its last layer output 10 '
                                         r'\(the other 2 are never a target\)'): learn.fit(1)
    with warnings.catch_warnings():  # a small batch could miss a class: no warning then
        warnings.simplefilter('error')
        TrainLearner(cnn(n_out=12), synth_dls(classes=False), F.cross_entropy).fit(1)


def test_a_regression_is_not_taken_for_a_classification():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, 3, generator=g)
    dls = DataLoaders(TensorDataLoader(x, y, 8), TensorDataLoader(x, y, 8))
    dls.classes = ['a', 'b']  # not about these outputs: float targets are no class indices
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        TrainLearner(nn.Linear(4, 3), dls, F.mse_loss).fit(1)


def test_outputs_of_another_width_for_a_loss_that_is_not_per_class_are_left_alone():
    "Embeddings against class labels (a metric-learning loss), or features looked at through a probe (ImageEval)."
    def spread(emb, y): return -torch.cdist(emb, emb).mean() + 0 * y.sum()  # a stand-in metric-learning loss
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        TrainLearner(cnn(n_out=32), synth_dls(), spread).fit(1)
    assert checks.is_classification_loss(partial(F.cross_entropy, label_smoothing=0.1))
    assert checks.is_classification_loss(nn.NLLLoss()) and not checks.is_classification_loss(spread)


# -- nll_loss on raw outputs -------------------------------------------------------------------------------------------
def test_nll_loss_on_raw_outputs_is_warned_once_a_fit():
    learn = TrainLearner(cnn(), synth_dls(), F.nll_loss, lr=0.5)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        learn.fit(2)
    msgs = [str(w.message) for w in seen if 'nll_loss' in str(w.message)]
    assert len(msgs) == 1, msgs
    assert msgs[0].startswith('nll_loss takes log-probabilities (the output of log_softmax), but the model outputs '
                              'raw scores (their log-sum-exp over the classes is up to ')
    assert msgs[0].endswith('use F.cross_entropy on raw outputs, or end the model with nn.LogSoftmax(dim=1)')
    assert [w.filename for w in seen if 'nll_loss' in str(w.message)] == [__file__], 'it points at the fit(...) line'


def test_nll_loss_on_log_probabilities_says_nothing():
    for loss in (F.nll_loss, nn.NLLLoss(), partial(F.nll_loss, reduction='mean')):
        learn = TrainLearner(nn.Sequential(cnn(), nn.LogSoftmax(1)), synth_dls(), loss)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            learn.fit(1)


def test_a_negative_nll_loss_is_named():
    model = cnn()
    with torch.no_grad(): model[-1].bias += 20  # large raw outputs: the first loss is already below 0
    learn = TrainLearner(model, synth_dls(), nn.NLLLoss())
    with pytest.warns(UserWarning, match=r'the first loss is -\d.*, below 0, which no classification loss can be'):
        learn.fit(1)


# -- fp16 on a CPU -----------------------------------------------------------------------------------------------------
FP16 = (r"^fp16 autocast on a CPU runs many times slower than fp32 .*Use bf16 \(precision_cbs\('bf16'\) or "
        r"MixedPrecision\(torch.bfloat16\); '--precision bf16' on the command line\)")


@pytest.mark.parametrize('cbs', [lambda: precision_cbs('fp16'), lambda: [MixedPrecision(torch.float16)]],
                         ids=['precision_cbs', 'MixedPrecision'])
def test_fp16_on_a_cpu_is_warned_once_naming_bf16(cbs):
    learn = Learner(cnn(), synth_dls(n_train=16, n_valid=16), F.cross_entropy, cbs=cbs())
    with pytest.warns(UserWarning, match=FP16): learn.fit(1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        learn.fit(1)  # once a process


def test_the_command_line_says_it_before_training(monkeypatch, tmp_path):
    import miniai.app.cli
    import miniai.app.recipe
    import miniai.core.devices
    ran = []
    def run_recipe(**kw):
        assert [str(w.message) for w in seen], 'said before the recipe starts'
        ran.append(kw['precision'])
        return {'accuracy': 0.}
    monkeypatch.setattr(miniai.app.recipe, 'run_recipe', run_recipe)
    monkeypatch.setattr(miniai.core.devices, 'default_device', lambda: 'cpu')  # a CPU run also on a GPU machine
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter('always')
        assert miniai.app.cli.main(['train', '--precision', 'fp16', '--out', tmp_path, '--no-tta']) == 0
    assert ran == ['fp16'] and len(seen) == 1
    assert __import__('re').match(FP16, str(seen[0].message))


# -- a schedule shorter than the fit -----------------------------------------------------------------------------------
def test_one_cycle_built_for_one_epoch_is_refused_at_before_fit_under_fit_2():
    dls, count = synth_dls(), CountBatches()
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=len(dls.train))
    learn = TrainLearner(cnn(), dls, F.cross_entropy, cbs=[BatchSchedCB(sched), count])
    with pytest.raises(ValueError) as info: learn.fit(2)
    assert str(info.value) == ('BatchSchedCB: OneCycleLR is built for 4 steps (total_steps), but this fit takes 8 '
                               '(2 epochs x 4 training batches): build it with total_steps=8')
    assert count.n == 0
    learn.fit(1)  # the right length trains


def test_an_epoch_schedule_is_counted_in_epochs():
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=2)
    learn = TrainLearner(cnn(), synth_dls(), F.cross_entropy, cbs=[EpochSchedCB(sched)])
    with pytest.raises(ValueError, match=r'^EpochSchedCB: OneCycleLR is built for 2 epochs \(total_steps\), but this '
                                         r'fit takes 3 \(epochs\): build it with total_steps=3$'): learn.fit(3)


class ShardLikeDDP(Callback):
    "What DDPCB (order 10) does to a TensorDataLoader in a 2-process job: this process takes half of each epoch."
    order = 10
    def before_fit(self, learn): learn.dls.train.rank, learn.dls.train.world_size = 0, 2
    def cleanup_fit(self, learn): learn.dls.train.rank, learn.dls.train.world_size = 0, 1


@pytest.fixture
def two_processes(monkeypatch):
    import miniai.callbacks.schedule
    monkeypatch.setattr(miniai.callbacks.schedule, 'world_size', lambda: 2, raising=False)


def test_a_schedule_built_for_the_whole_loader_under_ddp_sharding_is_refused_before_a_batch(two_processes):
    """With the loader sharded after the scheduler's before_fit, a one-cycle built from the whole loader (4 batches an
    epoch) runs only half its course (2 steps an epoch on this process) and ends at a high learning rate."""
    dls, count = synth_dls(), CountBatches()
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=2 * len(dls.train))
    learn = TrainLearner(cnn(), dls, F.cross_entropy, cbs=[BatchSchedCB(sched), ShardLikeDDP(), count])
    with pytest.raises(ValueError) as info: learn.fit(2)
    assert str(info.value) == ("BatchSchedCB: OneCycleLR is built for 8 steps (total_steps), but this fit takes 4 "
                               "(2 epochs x 2 training batches of this process's shard of the data (8 unsharded)): "
                               "build it with total_steps=4")
    assert count.n == 0


def test_a_schedule_built_for_this_processs_shard_trains(two_processes):
    "Counted against the whole loader at before_fit, the right schedule (4 steps) used to be refused as too short."
    dls, count = synth_dls(), CountBatches()
    sched = partial(optim.lr_scheduler.OneCycleLR, max_lr=1e-2, total_steps=2 * len(dls.train) // 2)
    cb = BatchSchedCB(sched)
    TrainLearner(cnn(), dls, F.cross_entropy, cbs=[cb, ShardLikeDDP(), count]).fit(2)
    assert count.n == 2 * (2 + 2) and cb.schedo.last_epoch == 4, 'every step of the schedule, and no more'


# -- a shape error inside the model ------------------------------------------------------------------------------------
def test_a_wrong_number_of_channels_names_the_module_the_shapes_and_what_it_expects():
    learn = TrainLearner(cnn(n_in=3), synth_dls(), F.cross_entropy)
    with pytest.raises(ModuleForwardError) as info: learn.fit(1)
    assert str(info.value).startswith("forward failed in module '0' (Conv2d) with input shape (16, 1, 8, 8); it "
                                      "expects 3 input channels: Given groups=1")
    assert isinstance(info.value.__cause__, RuntimeError), "torch's own error is kept as the cause"


def test_a_shape_error_deep_inside_names_the_path_and_the_batch_shape():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(100, 10)))
    learn = Learner(model, synth_dls(), F.cross_entropy, cbs=[TrainCB()])
    with pytest.raises(ModuleForwardError) as info: learn.fit(1)
    assert str(info.value).startswith("forward failed in module '0.2' (Linear) with input shape (16, 256); it expects "
                                      "100 input features (the last dimension); the batch had shape (16, 1, 8, 8): "
                                      "mat1 and mat2 shapes cannot be multiplied")


def test_an_error_raised_outside_the_model_reaches_the_caller_unchanged():
    err = RuntimeError('mine')
    class Raises(Callback):
        def after_predict(self, learn): raise err
    with pytest.raises(RuntimeError) as info: TrainLearner(cnn(), synth_dls(), F.cross_entropy, cbs=[Raises()]).fit(1)
    assert info.value is err


# -- devices -----------------------------------------------------------------------------------------------------------
def test_a_model_on_another_device_than_the_batch_names_both_and_devicecb():
    "The meta device stands in for a GPU: like one, it refuses CPU inputs."
    learn = TrainLearner(cnn().to('meta'), synth_dls(), F.cross_entropy)
    with pytest.raises(RuntimeError) as info: learn.fit(1)
    assert str(info.value).startswith("the model's parameters are on meta but the batch is on cpu: add DeviceCB() to "
                                      "the Learner's callbacks, which puts the model and every batch on one device")
    class Elsewhere(Callback):  # DeviceCB is there, and something after it moves the model
        order = 5
        def before_fit(self, learn): learn.model.to('meta')
    learn = TrainLearner(cnn(), synth_dls(), F.cross_entropy, cbs=[DeviceCB('cpu'), Elsewhere()])
    with pytest.raises(RuntimeError, match=r"on meta but the batch is on cpu: DeviceCB\('cpu'\) is there, so something "
                                           r"after it moved one of them"): learn.fit(1)


def test_a_model_that_moves_its_inputs_itself_gets_its_shape_error_not_a_device_one():
    class ToMeta(nn.Module):
        def forward(self, x): return x.to('meta').flatten(1)
    learn = TrainLearner(nn.Sequential(ToMeta(), nn.Linear(50, 10)).to('meta'), synth_dls(), F.cross_entropy)
    with pytest.raises(ModuleForwardError, match=r"^forward failed in module '1' \(Linear\) with input shape \(16, 64\); "
                                                 r"it expects 50 input features"): learn.fit(1)


def test_outputs_and_targets_on_different_devices_name_both_in_the_loss_error():
    from miniai.learner import compute_loss
    with pytest.raises(ValueError, match=r'^loss function cross_entropy got the model output on meta and the target '
                                         r'on cpu: DeviceCB\(\) puts the model and every batch on one device'):
        compute_loss(partial(F.cross_entropy, label_smoothing=0.1), torch.randn(4, 3, device='meta'),
                     torch.tensor([0, 1, 2, 0]))


# -- dict batches ------------------------------------------------------------------------------------------------------
class DictLoader:
    "The Hugging Face habit: each batch a dict."
    def __init__(self, dl): self.dl = dl
    def __len__(self): return len(self.dl)
    def __iter__(self): return ({'image': x, 'label': y} for x, y in self.dl)


def dict_dls():
    dls = synth_dls()
    return DataLoaders(DictLoader(dls.train), DictLoader(dls.valid))


@pytest.mark.parametrize('how', ['TrainLearner', 'TrainCB', 'MixedPrecision'])
def test_dict_batches_are_refused_naming_collate_dict_and_as_tuple(how):
    learn = (TrainLearner(cnn(), dict_dls(), F.cross_entropy) if how == 'TrainLearner' else
             Learner(cnn(), dict_dls(), F.cross_entropy,
                     cbs=[TrainCB() if how == 'TrainCB' else MixedPrecision(torch.bfloat16)]))
    with pytest.raises(TypeError) as info: learn.fit(1)
    step = 'TrainLearner.predict' if how == 'TrainLearner' else 'TrainCB.predict'
    assert str(info.value) == (
        f"the data loader yields dicts (keys 'image', 'label'), but {step} takes the model input as batch[0] and the "
        f"target as batch[1]. Make it yield tuples (DataLoaders.from_dd(dd, bs) does, with as_tuple=True, through "
        f"collate_dict; or collate_fn=collate_dict(ds)), or add NamedBatchCB(inputs=..., targets=...) naming the keys "
        f"(e.g. NamedBatchCB('image', 'label')).")


def test_named_batches_train_and_are_measured_like_tuples():
    a = TrainLearner(cnn(), dict_dls(), F.cross_entropy, cbs=[NamedBatchCB('image', 'label'), MetricsCB()])
    b = TrainLearner(cnn(), synth_dls(), F.cross_entropy, cbs=[MetricsCB()])
    a.fit(1)
    b.fit(1)
    assert [r['loss'] for r in a.metrics.history] == pytest.approx([r['loss'] for r in b.metrics.history], abs=1e-6)
    with pytest.raises(KeyError, match=r"NamedBatchCB: the batch has no 'labels'; its keys are 'image', 'label'"):
        TrainLearner(cnn(), dict_dls(), F.cross_entropy, cbs=[NamedBatchCB('image', 'labels')]).fit(1)


def test_a_learner_of_ones_own_that_reads_dicts_is_left_alone():
    class DictLearner(TrainLearner):
        def predict(self): self.preds = self.model(self.batch['image'])
        def get_loss(self): self.loss = F.cross_entropy(self.preds, self.batch['label'])
    DictLearner(cnn(), dict_dls(), F.cross_entropy).fit(1)


# -- the checks cost nothing after the first batch ---------------------------------------------------------------------
def test_the_checks_leave_the_dispatch_after_the_first_batch():
    seen = []
    class Spy(Callback):
        order = 1000
        def after_batch(self, learn):
            seen.append(sum(getattr(m, '__self__', None).__class__ is checks.FirstBatchChecks
                            for ev in ('before_batch', 'after_predict', 'after_loss') for m in learn._dispatch[ev]))
    TrainLearner(cnn(), synth_dls(), F.cross_entropy, cbs=[Spy()]).fit(1)
    assert seen == [0] * 6, 'after the first batch, no check is left in the per-batch events'


def test_off_the_cpu_the_values_are_read_at_the_end_of_the_first_epoch(monkeypatch):
    """A GPU stand-in: values are read where MetricsCB reads its own, so that no check waits for the device in a batch;
    except the largest target, read at the first batch, before the loss that it would crash (issue 29, item 4)."""
    monkeypatch.setattr(checks, '_reads_now', lambda device: False)
    count, when = CountBatches(), {}
    for name in ('_check_width', '_check_nll'):
        orig = getattr(checks.FirstBatchChecks, name)
        def spy(self, *a, _orig=orig, _name=name):
            when[_name] = count.n
            return _orig(self, *a)
        monkeypatch.setattr(checks.FirstBatchChecks, name, spy)
    dls = synth_dls(n_train=256, bs=128, classes=False)
    with pytest.warns(UserWarning, match='the largest target in the first batch of 128 is 9'):
        TrainLearner(cnn(n_out=12), dls, F.cross_entropy, cbs=[count]).fit(1)
    assert when['_check_width'] == 0, 'read at the first batch, before its loss'
    count.n = 0
    with pytest.warns(UserWarning, match='nll_loss takes log-probabilities'):
        TrainLearner(cnn(), synth_dls(), F.nll_loss, cbs=[count]).fit(1)
    assert when['_check_nll'] == 4
