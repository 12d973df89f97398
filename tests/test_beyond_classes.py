"""Targets beyond one class per image, on data made here from Fashion-MNIST (miniai.data.fashion_tasks): multi-label
(two garments side by side), regression (a garment's ink fraction) and image-to-image (14x14 -> 28x28), each loaded
from files as a user has them, trained for a few epochs to a bar a broken implementation would miss, predicted,
shown; and one clear error for each kind of bad input."""
import csv

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import miniai  # noqa: E402,F401  (the Learner methods)
from miniai.callbacks.metrics import MetricsCB  # noqa: E402
from miniai.core.learner import Learner, TrainCB  # noqa: E402
from miniai.core.state import set_seed  # noqa: E402
from miniai.data.dataloaders import DataLoaders  # noqa: E402
from miniai.data.decode import ImageDataError  # noqa: E402
from miniai.data.fashion import fashion_dls  # noqa: E402
from miniai.data.fashion_tasks import write_ink_regression, write_pairs_multilabel, write_upscale_pairs  # noqa: E402
from miniai.data.targetmetrics import MeanAbsoluteError, MultilabelF1, MultilabelThresholdAccuracy  # noqa: E402
from miniai.data.targets import Targets  # noqa: E402
from miniai.tools.export import load_exported  # noqa: E402
from miniai.tools.interpret import ClassificationInterpretation  # noqa: E402
from miniai.tools.results import TargetInterpretation  # noqa: E402

pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "The three problems as files, and a cache folder of their own."
    root = tmp_path_factory.mktemp('beyond')
    return dict(ml=write_pairs_multilabel(root / 'ml', 800), rg=write_ink_regression(root / 'rg', 400),
                up=write_upscale_pairs(root / 'up', 400), cache=root / 'cache')


def cnn(n_out: int, c: int = 16, pool=nn.AdaptiveMaxPool2d) -> nn.Module:
    "A small convolutional net: three stride-2 layers, pooled (max: is a garment there; mean: how much ink), a head."
    layers = []
    for ci, co in ((1, c), (c, 2 * c), (2 * c, 4 * c)): layers += [nn.Conv2d(ci, co, 3, 2, 1), nn.BatchNorm2d(co),
                                                                   nn.ReLU()]
    return nn.Sequential(*layers, pool(1), nn.Flatten(), nn.Linear(4 * c, n_out))


class Upscaler(nn.Module):
    "Bilinear x2, un-normalised to [0, 1] pixels, plus a correction from three convolutions: 14x14 in, 28x28 out."
    def __init__(self, mean: float, std: float, c: int = 16):
        super().__init__()
        self.mean, self.std, self.up = mean, std, nn.Upsample(scale_factor=2, mode='bilinear')
        self.body = nn.Sequential(nn.Conv2d(1, c, 3, 1, 1), nn.ReLU(), nn.Conv2d(c, c, 3, 1, 1), nn.ReLU(),
                                  nn.Conv2d(c, 1, 3, 1, 1))

    def forward(self, x):
        x = self.up(x)
        return x * self.std + self.mean + self.body(x)


def trained(dls, model: nn.Module, epochs: int, lr: float = 1e-2) -> Learner:
    "A Learner with the targets' default loss and metrics, fitted with a one-cycle schedule."
    set_seed(0)
    learn = Learner(model, dls, dls.targets.loss, lr=lr, cbs=[TrainCB(), MetricsCB(**dls.targets.metrics())],
                    opt_func=torch.optim.AdamW)
    learn.metrics = None
    learn.fit_one_cycle(epochs, lr)
    return learn


def last_valid(learn) -> dict: return [r for r in learn.metrics.history if r['train'] == 'eval'][-1]


def panels() -> int:
    "The image panels of the current figure."
    n = len([a for a in plt.gcf().axes if a.images])
    plt.close('all')
    return n


def test_multilabel_pairs_train_well_above_predicting_nothing_and_predict_their_labels(data):
    dls = DataLoaders.from_csv(data['ml'], label_delim=';', bs=32, seed=0, cache_dir=data['cache'])
    assert dls.targets.kind == 'multilabel' and dls.targets.loss is F.binary_cross_entropy_with_logits
    assert dls.train.y.shape == (640, 10) and dls.train.y.dtype == torch.float32
    assert set(dls.train.y.sum(1).tolist()) <= {1., 2.}  # one garment class, or two
    learn = trained(dls, cnn(10), 6)
    row = last_valid(learn)
    nothing = 1 - dls.valid.y.mean().item()  # the accuracy of predicting no label at all, whose F1 is 0
    assert row['f1_multi'] > 0.5, row
    assert row['accuracy_multi'] > nothing + 0.02, (row, nothing)
    p = learn.predict_item(dls.valid.x[0])
    assert isinstance(p.label, list) and set(p.label) <= set(dls.targets.classes)
    assert p.prob == sorted(p.prob, reverse=True) and all(q > 0.5 for q in p.prob) and p.probs.shape == (10,)
    batch = learn.predict_item(dls.valid.x[:5])
    assert len(batch.label) == 5 and batch.probs.shape == (5, 10)
    learn.show_results(max_n=5)
    assert panels() == 5
    dls.show_batch(4)  # titled with every label of the image
    titles = [a.get_title() for a in plt.gcf().axes[:4]]
    assert all(set(t.split(';')) <= set(dls.targets.classes) for t in titles) and any(';' in t for t in titles)
    plt.close('all')


def test_regression_on_ink_fraction_reaches_an_error_well_below_the_targets_spread(data, tmp_path):
    dls = DataLoaders.from_csv(data['rg'], bs=32, seed=0, cache_dir=data['cache'])  # a numeric column: inferred
    assert dls.targets.kind == 'regression' and dls.targets.classes == ['ink'] and dls.train.y.shape == (320, 1)
    learn = trained(dls, cnn(1, pool=nn.AdaptiveAvgPool2d), 4)
    row, spread = last_valid(learn), dls.valid.y.std().item()
    assert row['mae'] < 0.3 * spread, (row, spread)
    p = learn.predict_item(dls.valid.x[0])
    assert isinstance(p.label, float) and p.prob is None and abs(p.label - dls.valid.y[0].item()) < 3 * row['mae']
    exported = load_exported(learn.export(tmp_path / 'ink'))  # an export predicts values too
    assert exported.predict(dls.valid.x[0]).label == pytest.approx(p.label, abs=1e-5)
    values, targs = learn.get_preds(act=dls.targets.activate)
    assert values.shape == targs.shape == (80, 1)
    assert (values - targs).abs().mean() == pytest.approx(row['mae'], abs=1e-4)  # the metric, computed again
    learn.show_results(max_n=4)
    assert panels() == 4
    interp = TargetInterpretation.from_learner(learn)
    losses, idx = interp.top_losses(3)
    assert losses.tolist() == sorted(losses.tolist(), reverse=True) and losses[0] == interp.losses.max()
    interp.plot_top_losses(3)
    assert panels() == 3
    with pytest.raises(ValueError, match='these targets are regression: use .*TargetInterpretation'):
        ClassificationInterpretation.from_learner(learn)


def test_image_pairs_learn_to_upscale_and_predict_images(data):
    dls = DataLoaders.from_image_pairs(data['up'], bs=32, seed=0, cache_dir=data['cache'])
    assert dls.targets.kind == 'image' and dls.train.x.shape[1:] == (1, 14, 14) and dls.train.y.shape[1:] == (1, 28, 28)
    learn = trained(dls, Upscaler(dls.mean[0], dls.std[0]), 3, lr=3e-3)
    bilinear = F.mse_loss(F.interpolate(dls.valid.x.float() / 255, scale_factor=2, mode='bilinear'), dls.valid.y)
    row = last_valid(learn)
    assert row['mse'] < 0.9 * bilinear.item() < 0.9 * 0.25 * dls.valid.y.var().item(), (row, bilinear)
    p = learn.predict_item(dls.valid.x[0])
    assert isinstance(p.label, torch.Tensor) and p.label.shape == (1, 28, 28)
    assert 0 <= p.label.min() <= p.label.max() <= 1
    learn.show_results(max_n=4)
    assert panels() == 12  # input | target | prediction for each
    dls.show_batch(3)
    assert panels() == 6  # input | target
    TargetInterpretation.from_learner(learn).plot_top_losses(2)
    assert panels() == 6


def test_a_single_label_csv_gives_classes_and_existing_loaders_stay_class(tmp_path, data):
    rows = list(csv.reader(open(data['ml'] / 'labels.csv')))
    with open(tmp_path / 'one.csv', 'w', newline='') as f:  # the first label of each row: one class per image
        csv.writer(f).writerows([['fname', 'label', 'is_valid']] + [[fn, labs.split(';')[0], i % 4 == 0]
                                                                    for i, (fn, labs) in enumerate(rows[1:121])])
    dls = DataLoaders.from_csv(data['ml'], csv=str(tmp_path / 'one.csv'), valid_col='is_valid', bs=16,
                               cache_dir=data['cache'], shuffle=False)
    assert dls.targets.kind == 'class' and dls.train.y.dtype == torch.int64
    assert len(dls.valid.y) == 30 and len(dls.train.y) == 90  # the validation column, not valid_pct
    assert dls.classes == sorted(dls.classes)
    dls.show_batch(4)
    first = [labs.split(';')[0] for i, (_, labs) in enumerate(rows[1:121]) if i % 4][:4]  # training rows, in order
    assert [a.get_title() for a in plt.gcf().axes[:4]] == first
    plt.close('all')
    assert fashion_dls(bs=64, n_train=64, n_valid=64).targets.kind == 'class'


def test_from_df_reads_as_from_csv(data):
    import pandas as pd
    df = pd.read_csv(data['rg'] / 'labels.csv')
    a = DataLoaders.from_df(df, data['rg'], bs=32, seed=0, cache_dir=data['cache'])
    b = DataLoaders.from_csv(data['rg'], bs=32, seed=0, cache_dir=data['cache'])
    assert torch.equal(a.train.y, b.train.y) and torch.equal(a.valid.x, b.valid.x) and a.targets == b.targets


def write(path, text: str): path.write_text(text)


def test_each_bad_table_gets_one_clear_error(tmp_path, data):
    base = data['ml']
    write(tmp_path / 'missing.csv', 'fname,labels\nimages/00000.png,Bag\nimages/nope.png,Coat\n')
    with pytest.raises(ImageDataError, match=r'row 2: the image .*nope.png does not exist'):
        DataLoaders.from_csv(base, csv=str(tmp_path / 'missing.csv'))
    with pytest.raises(ImageDataError, match=r"no column 'tags' \(labels\); its columns are 'fname', 'labels'"):
        DataLoaders.from_csv(base, label_col='tags')
    write(tmp_path / 'value.csv', 'fname,ink\nimages/00000.png,0.3\nimages/00001.png,lots\n')
    with pytest.raises(ImageDataError, match=r"row 2 \(images/00001.png\): 'lots' in column 'ink' is not a number"):
        DataLoaders.from_csv(base, csv=str(tmp_path / 'value.csv'), y_block='regression')
    write(tmp_path / 'blank.csv', 'fname,ink\nimages/00000.png,0.3\nimages/00001.png,\nimages/00002.png,0.1\n')
    with pytest.raises(ImageDataError, match=r"row 2 \(images/00001.png\): '' in column 'ink' is not a number"):
        DataLoaders.from_csv(base, csv=str(tmp_path / 'blank.csv'))  # inferred regression: the blank is named
    with pytest.raises(ImageDataError,
                       match=r"row 1 \(images/00000.png\): label 'Shirt' is not in the vocab \(Bag, Coat\)"):
        DataLoaders.from_csv(base, label_delim=';', vocab=['Bag', 'Coat'], cache_dir=data['cache'])
    (data['up'] / 'inputs' / 'lonely.png').write_bytes((data['up'] / 'inputs' / '00000.png').read_bytes())
    try:
        with pytest.raises(ImageDataError, match=r'1 input image\(s\) have no target of the same name'):
            DataLoaders.from_image_pairs(data['up'])
    finally: (data['up'] / 'inputs' / 'lonely.png').unlink()


def test_the_first_batch_check_names_a_multilabel_width_that_differs_from_the_outputs(data):
    dls = DataLoaders.from_csv(data['ml'], label_delim=';', bs=32, seed=0, cache_dir=data['cache'])
    learn = Learner(cnn(8), dls, dls.targets.loss, cbs=[TrainCB()])
    with pytest.raises(ValueError, match='outputs 8 values per item, but the multilabel targets have 10 labels'):
        learn.fit(1)


def test_the_metrics_count_as_defined():
    logits = torch.tensor([[3., -3., 3.], [-3., -3., 3.]])  # predicted: {0, 2}, {2}
    target = torch.tensor([[1., 0., 0.], [0., 1., 1.]])      # true:      {0},    {1, 2}
    f1, acc = MultilabelF1(), MultilabelThresholdAccuracy()
    for m in (f1, acc): m.update(logits[:1], target[:1]).update(logits[1:], target[1:])
    assert f1.compute().item() == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # tp 2, fp 1, fn 1
    assert acc.compute().item() == pytest.approx(4 / 6)
    mae = MeanAbsoluteError().update(torch.tensor([[1.], [2.]]), torch.tensor([[0.], [4.]]))
    assert mae.compute().item() == pytest.approx(1.5)
    with pytest.raises(ValueError, match='unknown target kind'): Targets('masks')
