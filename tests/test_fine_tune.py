"""Parameter groups, freezing, discriminative learning rates, one-line fits and fine_tune, on a tiny conv model."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.callbacks.onecycle import LoaderSchedCB, one_cycle
from miniai.callbacks.schedule import RecorderCB
from miniai.callbacks.suggest import lr_suggestions
from miniai.core.groups import default_splitter, split_params, spread_lrs
from miniai.datasets import DataLoaders
from miniai.learner import TrainLearner
from miniai.models.resnet import fashion_resnet9
from miniai.runs.checkpoint import SaveModelCB


def tiny_model():
    body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    return nn.Sequential(body, nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)))


def tiny_learner(seed=0, n=48, bs=8, **kw):
    torch.manual_seed(seed)
    x, y = torch.randn(n, 1, 6, 6), torch.randint(0, 3, (n,))
    dl = [(x[i:i + bs], y[i:i + bs]) for i in range(0, n, bs)]
    return TrainLearner(tiny_model(), DataLoaders(dl, dl[:2]), F.cross_entropy, lr=1e-2, opt_func=optim.AdamW, **kw)


def test_library_models_split_into_body_halves_and_head():
    g = default_splitter(tiny_model())
    assert len(g) == 3 and isinstance(g[2][0][-1], nn.Linear)
    assert len(split_params(fashion_resnet9())) == 3  # a ResNet: its conv stages, then the head
    assert len(split_params(nn.Linear(2, 2))) == 1


def test_slice_spreads_learning_rates_geometrically_and_bad_ones_are_refused():
    assert spread_lrs(slice(1e-4, 1e-2), 3) == pytest.approx([1e-4, 1e-3, 1e-2])
    assert spread_lrs(slice(1e-2), 3) == pytest.approx([1e-3, 1e-3, 1e-2])
    with pytest.raises(ValueError, match='lo <= hi'): spread_lrs(slice(1e-2, 1e-4), 3)
    with pytest.raises(ValueError, match='1 group'): spread_lrs(slice(1e-4, 1e-2), 1)
    with pytest.raises(ValueError, match='3 parameter groups'): spread_lrs([1e-3, 1e-2], 3)
    learn = tiny_learner()
    learn.fit(1, lr=slice(1e-4, 1e-2))
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-4, 1e-3, 1e-2])


def test_freeze_trains_only_the_head_and_batchnorm():
    learn = tiny_learner()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.freeze()
    learn.fit(1)
    after = learn.model.state_dict()
    conv_w, bn_w, head_w = '0.0.weight', '0.1.weight', '1.2.weight'
    assert torch.equal(before[conv_w], after[conv_w]) and learn.model[0][0].weight.grad is None
    assert not torch.equal(before[bn_w], after[bn_w]) and not torch.equal(before[head_w], after[head_w])
    learn.splitter = lambda m: [m[0][:3], m[0][3:], m[1]]
    learn.freeze_to(1)
    assert not learn.model[0][0].weight.requires_grad and learn.model[0][3].weight.requires_grad
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters())


def test_freeze_on_a_one_group_model_is_refused():
    learn = TrainLearner(nn.Linear(2, 2), DataLoaders([], []), F.mse_loss)
    with pytest.raises(ValueError, match='one parameter group'): learn.freeze()
    learn.splitter = lambda m: [[m.weight], [m.bias]]  # any model can be given groups
    learn.freeze()
    assert not learn.model.weight.requires_grad and learn.model.bias.requires_grad


def test_fit_one_cycle_counts_its_steps_from_the_loaders_per_group():
    learn = tiny_learner()
    rec = RecorderCB(lr=lambda cb: [g['lr'] for g in cb.pgs])
    learn.fit_one_cycle(2, slice(1e-4, 1e-2), cbs=rec)
    lrs = torch.tensor(rec.recs['lr'])
    assert lrs.shape == (12, 3)  # 2 epochs x 6 batches, 3 groups
    peak = lrs.max(0).values
    assert peak.tolist() == pytest.approx([1e-4, 1e-3, 1e-2], rel=1e-3)
    assert (lrs[-1] < peak / 10).all()  # annealed by the last batch: the schedule is as long as the fit


def test_fit_one_cycle_takes_a_fit_of_a_few_steps():
    learn = tiny_learner(n=32)  # 4 batches: a warm-up of exactly one step, which OneCycleLR cannot divide by
    learn.fit_one_cycle(1, 1e-2)


def test_fit_flat_cos_holds_then_anneals():
    learn = tiny_learner()
    rec = RecorderCB(lr=lambda cb: cb.pg['lr'])
    learn.fit_flat_cos(2, 1e-2, cbs=rec)
    lr = rec.recs['lr']
    assert lr[:9] == pytest.approx([1e-2] * 9) and lr[-1] < 1e-3 and lr == sorted(lr, reverse=True)


def test_fine_tune_freezes_then_unfreezes_with_discriminative_rates():
    learn, seen = tiny_learner(), []
    learn.fine_tune(1, base_lr=1e-2, freeze_epochs=1, cbs=_Seen(seen))
    assert seen == [True, False]  # the body frozen in the first fit, not in the second
    peaks = [g['max_lr'] for g in learn.opt.param_groups]  # the second fit's one-cycle peaks
    assert peaks == pytest.approx([5e-5, 5e-4, 5e-3])


class _Seen:
    order = 0
    def __init__(self, seen): self.seen = seen
    def before_fit(self, learn): self.seen.append(not learn.model[0][0].weight.requires_grad)


def test_resume_with_frozen_groups_is_exact(tmp_path):
    def frozen_run(*cbs):
        learn = tiny_learner(seed=1)
        learn.freeze()
        learn.fit_one_cycle(3, slice(1e-4, 1e-2), cbs=list(cbs))
        return learn
    full = frozen_run()
    frozen_run(SaveModelCB(tmp_path, every_epoch=True, save_best=False), _StopAfter(1))  # stops after 2 epochs
    torch.manual_seed(5)
    again = tiny_learner(seed=1)  # a fresh learner, not frozen: the checkpoint says the run was
    again.fit_one_cycle(3, slice(1e-4, 1e-2), resume=tmp_path / 'last.ckpt')
    assert not again.model[0][0].weight.requires_grad and again.model[1][2].weight.requires_grad
    for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()): assert torch.equal(a, b)


class _StopAfter:
    order = 30
    def __init__(self, epoch): self.epoch = epoch
    def after_epoch(self, learn):
        from miniai.core.events import CancelFitException
        if not learn.training and learn.epoch == self.epoch: raise CancelFitException()


def test_lr_find_suggests_valley_minimum_and_steep():
    lrs = [1e-5 * 1.3 ** i for i in range(40)]
    losses = [2.0] * 10 + [2.0 - 0.1 * i for i in range(1, 16)] + [0.5 + 0.3 * i for i in range(15)]
    s = lr_suggestions(lrs, losses)
    assert s.steep < s.minimum * 10 and lrs[10] <= s.valley <= lrs[26] and float(s) == s.minimum
    learn = tiny_learner()
    got = learn.lr_find(plot=False, max_epochs=3)
    assert set(got.as_dict()) == {'valley', 'minimum', 'steep'} and all(v > 0 for v in got.as_dict().values())


def test_loader_schedule_refuses_a_resume_of_another_length(tmp_path):
    learn = tiny_learner()
    learn.fit(1, cbs=[LoaderSchedCB(one_cycle()), SaveModelCB(tmp_path, every_epoch=True, save_best=False)])
    from miniai.core.state import CheckpointError
    with pytest.raises(CheckpointError, match='scheduled for'):
        learn.fit_one_cycle(4, resume=tmp_path / 'last.ckpt')


def test_schedule_built_after_sharding_matches_and_resumes_exactly(tmp_path, monkeypatch):
    "Under several processes the schedule is built at the first training epoch (after DDPCB shards): same rates."
    import miniai.callbacks.onecycle as oc
    def lrs(**kw):
        learn, rec = tiny_learner(seed=2), RecorderCB(lr=lambda cb: [g['lr'] for g in cb.pgs])
        learn.fit_one_cycle(2, slice(1e-4, 1e-2), cbs=rec, **kw)
        return rec.recs['lr'], learn
    alone, full = lrs()
    monkeypatch.setattr(oc, 'world_size', lambda: 2)
    deferred, _ = lrs()
    assert deferred == alone
    half = tiny_learner(seed=2)
    half.fit_one_cycle(2, slice(1e-4, 1e-2), cbs=[SaveModelCB(tmp_path, every_epoch=True, save_best=False),
                                                  _StopAfter(0)])
    _, again = lrs(resume=tmp_path / 'last.ckpt')
    for a, b in zip(full.model.state_dict().values(), again.model.state_dict().values()): assert torch.equal(a, b)


def test_lr_find_plot_marks_the_three_suggestions():
    import matplotlib
    matplotlib.use('Agg')
    from miniai.callbacks.schedule import LRFinderCB
    cb = LRFinderCB(plot=False)
    cb.lrs, cb.losses = [1e-5 * 1.3 ** i for i in range(30)], [2.0 - 0.05 * i for i in range(20)] + [3.0] * 10
    labels = [t.get_text().split()[0] for t in cb.plot().get_legend().get_texts()]
    assert labels == ['valley', 'minimum', 'steep']
