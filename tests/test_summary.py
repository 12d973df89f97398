"""summary: shapes, parameters, counted FLOPs, both renderings, and a look that changes nothing."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn, optim
from torch.utils.flop_counter import FlopCounterMode

from miniai.data.fashion import fashion_dls, find_fashion_mnist
from miniai.learner import TrainLearner
from miniai.resnet import fashion_resnet, seed002_resnet
from miniai.core.checks import ModuleForwardError
from miniai.tools.summary import Summary, summary


def test_rows_shapes_and_params_of_the_seed_model():
    s = summary(seed002_resnet(pool=True), (64, 1, 28, 28))
    assert [r['type'] for r in s.rows] == ['ResBlock'] * 6 + ['GlobalAvgPool', 'Flatten', 'Linear']
    assert s.rows[0]['input_shape'] == (64, 1, 28, 28) and s.rows[5]['output_shape'] == (64, 256, 1, 1)
    assert [r['params'] for r in s.rows] == [680, 3632, 14432, 57536, 229760, 918272, 0, 0, 2570]
    assert s.totals['params'] == s.totals['trainable'] == 1226882
    assert s.totals['param_bytes'] == 1226882 * 4


@pytest.mark.parametrize('pool', [False, True])
def test_row_flops_add_up_to_the_total(pool):
    s = summary(seed002_resnet(pool=pool), (8, 1, 28, 28))
    assert sum(r['flops'] for r in s.rows) == s.totals['flops'] > 0
    # the first block, counted by hand: two 3x3 convs 1->8 and 8->8 and a 1x1 conv 1->8, at 28x28, 2 flops per MAC
    assert s.rows[0]['flops'] == 2 * 8 * 28 * 28 * (9 * 1 * 8 + 9 * 8 * 8 + 1 * 8)


def test_resnet18_flops_match_flop_counter_and_fvcore():
    m = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 224, 224)
    s = summary(m, x)
    with FlopCounterMode(display=False) as c:
        m(x)
    assert s.totals['flops'] == pytest.approx(c.get_total_flops(), rel=0.01)
    fvcore = pytest.importorskip('fvcore.nn', reason='fvcore not installed')
    macs = fvcore.FlopCountAnalysis(m, x).unsupported_ops_warnings(False).uncalled_modules_warnings(False).total()
    assert s.totals['flops'] == pytest.approx(2 * macs, rel=0.01)  # fvcore counts a multiply-add as one
    assert s.totals['train_step_flops'] == pytest.approx(3 * s.totals['flops'], rel=0.05)


def test_depth_expands_children():
    s = summary(seed002_resnet(), (2, 1, 28, 28), depth=2)
    assert s.rows[0]['module'] == '0.convs' and s.rows[1]['module'] == '0.idconv'
    assert sum(r['params'] for r in s.rows) == 1247362
    assert sum(r['flops'] for r in s.rows) == s.totals['flops']
    with pytest.raises(ValueError, match='depth'):
        summary(seed002_resnet(), (2, 1, 28, 28), depth=0)


def test_text_and_markdown_renderings():
    s = summary(seed002_resnet(pool=True), (16, 1, 28, 28))
    md = s._repr_markdown_()
    assert md.startswith('|Module|Type|Input|Output|Params|Trainable|FLOPs|\n|--|')
    assert '|8|Linear|(16, 256)|(16, 10)|2,570|2,570|' in md and 'Total params: 1,226,882' in md
    text = str(s)
    assert text.splitlines()[0].split() == ['Module', 'Type', 'Input', 'Output', 'Params', 'Trainable', 'FLOPs']
    assert 'Total params: 1,226,882' in text and 'training step' in text
    d = s.to_dict()
    assert d['totals']['params'] == 1226882 and len(d['rows']) == 9 and d['rows'][0]['type'] == 'ResBlock'


def snapshot(model, opt):
    return (copy.deepcopy(model.state_dict()), {m: m.training for m in model.modules()},
            copy.deepcopy(opt.state_dict()), torch.get_rng_state(), [p.grad for p in model.parameters()])


def assert_same(before, model, opt):
    sd, modes, osd, rng, grads = before
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items()), 'a parameter or buffer changed'
    assert {m: m.training for m in model.modules()} == modes
    assert opt.state_dict()['state'].keys() == osd['state'].keys()
    for k, st in osd['state'].items():
        assert all(torch.equal(st[n], opt.state_dict()['state'][k][n]) for n in st)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(grads, [p.grad for p in model.parameters()]))
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')
def test_learner_summary_changes_nothing():
    dls = fashion_dls(bs=128, n_train=1024, n_valid=256, seed=0, device='cpu')  # the model stays on the CPU
    model = fashion_resnet(nfs=(8, 16, 32), drop=0.5)
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1, opt_func=optim.AdamW)
    learn.fit(1, valid=False)  # BatchNorm statistics, AdamW state and gradients all exist now
    model.train()
    order = dls.train.state_dict()
    before = snapshot(model, learn.opt)
    s = learn.summary()
    assert isinstance(s, Summary) and s.rows[0]['input_shape'] == (128, 1, 28, 28)
    assert_same(before, model, learn.opt)
    assert torch.equal(dls.train.state_dict()['gen'], order['gen']), 'the data order moved on'
    model.eval()
    before = snapshot(model, learn.opt)
    learn.summary(depth=2)
    assert_same(before, model, learn.opt)


def test_failed_forward_names_module_and_shape_and_restores():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Flatten(), nn.Linear(10, 2)))
    opt = optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, opt)
    with pytest.raises(ModuleForwardError, match=r"module '2\.1' \(Linear\) with input shape \(3, 2704\)"):
        summary(model, (3, 1, 28, 28))
    assert_same(before, model, opt)
