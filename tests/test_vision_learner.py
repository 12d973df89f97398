"""vision_learner: torchvision and timm backbones, their pretrained weights loaded through the libraries' own paths
from local files, the first convolution adapted to the data's channels, a new head, the weights' normalisation."""
import importlib.util

import pytest
import torch
import torchvision
from torch import nn

from miniai.data.dataloaders import DataLoaders
from miniai.data.loader import TensorDataLoader
from miniai.models.backbones import adapt_first_conv, resolve_arch
from miniai.models.vision import vision_learner


def grey_dls(n=16, c=1, size=32):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g), torch.arange(n) % 3
    dls = DataLoaders(TensorDataLoader(x, y, 8, mean=0.3, std=0.3), TensorDataLoader(x, y, 8, mean=0.3, std=0.3))
    dls.classes, dls.mean, dls.std = ['a', 'b', 'c'], (0.3,), (0.3,)
    return dls


def test_torchvision_weights_load_through_weights_and_grey_keeps_them(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    w = torchvision.models.ResNet18_Weights.DEFAULT
    torch.manual_seed(3)
    saved = torchvision.models.resnet18().state_dict()
    (tmp_path / 'hub' / 'checkpoints').mkdir(parents=True)
    torch.save(saved, tmp_path / 'hub' / 'checkpoints' / w.url.rsplit('/', 1)[-1])  # where weights= looks first
    dls = grey_dls()
    learn = vision_learner(dls, 'resnet18', pretrained=True)
    body, head = learn.model
    assert torch.equal(body[0].weight, saved['conv1.weight'].sum(1, keepdim=True))  # grey: the colours' sum
    assert torch.equal(body[7][1].conv2.weight, saved['layer4.1.conv2.weight'])
    assert dls.mean == pytest.approx((sum(w.transforms().mean) / 3,)) and dls.train.mean == dls.mean
    assert isinstance(head[-1], nn.Linear) and head[-1].out_features == 3
    xb, _ = next(iter(dls.train))
    assert learn.model.eval()(xb).shape == (8, 3)
    assert len(learn.model[0]) == 8 and not learn.freeze().model[0][0].weight.requires_grad


def test_fresh_backbone_takes_any_channel_count_and_keeps_loader_stats():
    dls = grey_dls(c=5)
    learn = vision_learner(dls, torchvision.models.resnet18, pretrained=False)
    assert learn.model[0][0].in_channels == 5 and dls.mean == (0.3,) and learn.pretrained_stats is None


def test_adapting_repeats_weights_for_more_channels_and_refuses_a_grouped_first_conv():
    conv = nn.Conv2d(3, 4, 3)
    w = conv.weight.detach().clone()
    adapt_first_conv(nn.Sequential(conv), 6)
    assert torch.allclose(conv.weight, torch.cat([w, w], 1) / 2)
    with pytest.raises(ValueError, match='grouped'): adapt_first_conv(nn.Sequential(nn.Conv2d(4, 4, 3, groups=4)), 1)


def test_unknown_arch_names_the_closest_and_missing_timm_names_the_extra(monkeypatch):
    with pytest.raises(ValueError, match=r"unknown architecture 'resnt18'.*closest names: resnet18"):
        resolve_arch('resnt18')
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda n, *a: None if n == 'timm' else real(n, *a))
    with pytest.raises(ValueError, match=r"pip install 'miniai-learner\[timm\]'"): resolve_arch('test_resnet')


@pytest.mark.skipif(importlib.util.find_spec('timm') is None, reason='timm is not installed')
def test_timm_weights_load_through_pretrained_cfg_overlay(tmp_path):
    import timm
    torch.manual_seed(4)
    src = timm.create_model('test_resnet', pretrained=False)
    torch.save(src.state_dict(), tmp_path / 'w.pth')
    dls = grey_dls()
    learn = vision_learner(dls, 'test_resnet', pretrained=True, weights_file=tmp_path / 'w.pth')
    body = learn.model[0]
    assert torch.allclose(body.conv1[0].weight, src.conv1[0].weight.sum(1, keepdim=True), atol=1e-6)
    assert dls.mean == pytest.approx((src.pretrained_cfg['mean'][0],))
    learn.fine_tune(0, freeze_epochs=1)  # trains: the body's groups come from the timm model's children


def test_fused_adamw_steps_as_plain_adamw_does_and_is_vision_learners_default():
    "The fused kernel is an optimisation only: the same steps (groups and rates kept), and what vision_learner uses."
    from miniai.models.vision import fused_adamw
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    fused = fused_adamw([{'params': [a.weight], 'lr': 1e-2}, {'params': [a.bias]}],
                        lr=1e-3, weight_decay=0.1)
    plain = torch.optim.AdamW([{'params': [b.weight], 'lr': 1e-2}, {'params': [b.bias]}], lr=1e-3, weight_decay=0.1)
    assert fused.defaults['fused'] and not plain.defaults['fused']
    for _ in range(3):
        for m, o in ((a, fused), (b, plain)):
            m(torch.ones(2, 4)).pow(2).sum().backward()
            o.step()
            o.zero_grad()
    torch.testing.assert_close(a.weight, b.weight)
    torch.testing.assert_close(a.bias, b.bias)
    assert not fused_adamw(nn.Linear(2, 2, device='meta').parameters()).defaults['fused']  # no kernel there: plain
    learn = vision_learner(grey_dls(), 'resnet18', pretrained=False)
    learn.fit(1, valid=False)
    assert learn.opt.defaults['fused']
