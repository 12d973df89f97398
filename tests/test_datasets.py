"""DataLoaders, collation of dictionary datasets, image display, and the plain training loop, on real data."""
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from torch import nn, optim

from miniai.datasets import DataLoaders, collate_dict, get_grid, inplace, show_image, show_images, subplots
from miniai.data import fashion
from miniai.data.fashion import CLASSES, fashion_arrays, find_fashion_mnist
from miniai.training import Dataset, accuracy, fit, get_dls, report

needs_data = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed (make data)')


@pytest.fixture(scope='module')
def small_dd():
    "A `DatasetDict` laid out like the hub's, of the first 200 training and 100 test images of the real data."
    if find_fashion_mnist() is None: pytest.skip('Fashion-MNIST is not installed (make data)')
    arr = fashion_arrays()
    dd = fashion._build({'train': (arr['train'][0][:200], arr['train'][1][:200]),
                         'test': (arr['test'][0][:100], arr['test'][1][:100])})
    assert dd['train'][0]['image'].mode == 'L' and dd['train'].features['label'].names == CLASSES
    return dd


@needs_data
def test_from_dd_yields_tuples_of_the_right_shapes(small_dd):
    @inplace
    def to_tensor(b): b['image'] = [TF.to_tensor(o) for o in b['image']]
    tds = small_dd.with_transform(to_tensor)
    dls = DataLoaders.from_dd(tds, batch_size=32)
    xb, yb = next(iter(dls.train))
    assert xb.shape == (32, 1, 28, 28) and yb.shape == (32,) and yb.dtype == torch.int64
    xv, yv = next(iter(dls.valid))
    assert xv.shape == (64, 1, 28, 28), 'the validation loader uses twice the batch size'
    assert len(dls.train) == 7


@needs_data
def test_collate_dict_returns_feature_columns_in_order(small_dd):
    @inplace
    def to_tensor(b): b['image'] = [TF.to_tensor(o) for o in b['image']]
    ds = small_dd['train'].with_transform(to_tensor)
    x, y = collate_dict(ds)([ds[0], ds[1]])
    assert x.shape == (2, 1, 28, 28) and y.tolist() == [small_dd['train'][0]['label'], small_dd['train'][1]['label']]


def test_inplace_returns_its_argument():
    f = inplace(lambda d: d.update(a=1))
    d = {}
    assert f(d) is d and d == {'a': 1}


def test_dataloaders_needs_two_loaders():
    with pytest.raises(ValueError, match='training and a validation loader'):
        DataLoaders([1])


@needs_data
def test_show_images_draws_a_grid():
    x = fashion_arrays()['train'][0][:7]
    assert show_images(x, ncols=4, titles=[str(i) for i in range(7)]) is None, 'a returned Figure shows twice'
    fig = plt.gcf()
    drawn = [ax for ax in fig.axes if ax.images]
    assert len(drawn) == 7 and len(fig.axes) == 8, 'a 2x4 grid, seven images, the spare axis left empty'
    assert fig.axes[2].get_title() == '2' and (drawn[3].images[0].get_array() == x[3].numpy()).all()
    plt.close('all')


def test_show_image_takes_chw_tensors_and_returns_axes():
    ax = show_image(torch.rand(3, 10, 12), title='x')
    assert ax.images[0].get_array().shape == (10, 12, 3) and ax.get_title() == 'x'
    ax = show_image(torch.rand(1, 10, 12))
    assert ax.images[0].get_array().shape == (10, 12)
    fig, axs = get_grid(5, nrows=2)
    assert axs.shape == (2, 3) and not axs.flat[5].axison
    fig, ax = subplots(imsize=2)
    assert tuple(fig.get_size_inches()) == (2, 2)
    plt.close('all')


def test_accuracy_and_report(capsys):
    out, y = torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1])
    assert accuracy(out, y).item() == 0.5
    report(torch.tensor(0.25), out, y)
    assert capsys.readouterr().out.strip() == '0.25, 0.50'


def test_dataset_checks_lengths():
    with pytest.raises(ValueError, match='x has 3 items but y has 2'):
        Dataset([1, 2, 3], [1, 2])


@needs_data
def test_plain_fit_learns_fashion_mnist():
    arr = fashion_arrays()
    (x, y), (xv, yv) = arr['train'], arr['test']
    x, xv = [(t.float().view(-1, 784) / 255 - 0.286) / 0.353 for t in (x[:5000], xv[:1000])]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    train_dl, valid_dl = get_dls(Dataset(x, y[:5000]), Dataset(xv, yv[:1000]), bs=64)
    loss, acc = fit(3, model, F.cross_entropy, optim.SGD(model.parameters(), lr=0.02), train_dl, valid_dl)
    assert acc > 0.7 and loss < 0.9
