"""What a classifier gets wrong, on Fashion-MNIST: the confusion matrix, the most confused pairs and the top losses
agree with a direct computation from the model's outputs, and the plots show class names and un-normalised images."""
import matplotlib
import matplotlib.pyplot as plt
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim

from miniai.activations import set_seed
from miniai.data.fashion import CLASSES, fashion_dls, find_fashion_mnist
from miniai.tools.interpret import ClassificationInterpretation
from miniai.learner import TrainLearner

pytestmark = pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed')


@pytest.fixture(scope='module')
def learn():
    "A small MLP after one epoch on 4096 images: right about three times in four, so there is something to see."
    set_seed(0)
    dls = fashion_dls(bs=256, n_train=4096, n_valid=1000, seed=0, device='cpu')
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    learn = TrainLearner(model, dls, F.cross_entropy, lr=3e-3, opt_func=optim.AdamW)
    learn.fit(1)
    return learn


@pytest.fixture(scope='module')
def interp(learn): return ClassificationInterpretation.from_learner(learn)


def direct(learn):
    dl = learn.dls.valid
    xv, yv = dl.normalise(dl.x), dl.y  # the loader holds uint8 pixels and normalises them per batch
    with torch.no_grad(): out = learn.model.eval()(xv)
    return out, yv


def test_confusion_matrix_and_most_confused_against_a_direct_count(learn, interp):
    out, yv = direct(learn)
    pred = out.argmax(1)
    cm = interp.confusion_matrix()
    want = torch.zeros(10, 10, dtype=torch.long)
    for a, p in zip(yv.tolist(), pred.tolist()): want[a, p] += 1
    assert torch.equal(cm, want) and cm.sum() == 1000
    assert 0.6 < cm.trace().item() / 1000 < 0.95
    confused = interp.most_confused()
    counts = [c for _, _, c in confused]
    assert counts == sorted(counts, reverse=True) and sum(counts) == 1000 - cm.trace().item()
    a, p, c = confused[0]
    assert c == want[CLASSES.index(a), CLASSES.index(p)] and a != p
    assert all(c >= 3 for _, _, c in interp.most_confused(min_val=3))


def test_top_losses_are_the_highest_per_item_losses(learn, interp):
    out, yv = direct(learn)
    per_item = F.cross_entropy(out, yv, reduction='none')
    losses, idx = interp.top_losses(9)
    assert torch.allclose(losses, per_item.sort(descending=True).values[:9], atol=1e-5)
    assert torch.allclose(per_item[idx], losses, atol=1e-5)
    assert torch.allclose(interp.probs, out.softmax(1), atol=1e-5)


def test_the_plots_show_class_names_and_un_normalised_images_once(learn, interp):
    plt.close('all')
    assert interp.plot_confusion_matrix() is None, 'a Figure returned at the end of a Jupyter cell shows twice'
    ax = plt.gcf().axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES == [t.get_text() for t in ax.get_yticklabels()]
    cm = interp.confusion_matrix()
    assert {t.get_text() for t in ax.texts} >= {str(int(v)) for v in cm.flatten()}, 'the counts are written in'
    assert interp.plot_top_losses(6) is None
    fig = plt.gcf()
    images = [a.images[0] for a in fig.axes if a.images]
    losses, idx = interp.top_losses(6)
    assert len(images) == 6
    dls = learn.dls
    first = dls.valid.x[idx[0]][0].float() / 255  # the image's own pixels, in [0, 1]
    assert torch.allclose(torch.as_tensor(images[0].get_array()), first, atol=1e-5), 'shown as its pixels'
    assert dls.std != 1 and dls.mean != 0, 'so the plot had to un-normalise the batch'
    p, a = interp.preds[idx[0]].item(), interp.targs[idx[0]].item()
    assert images[0].axes.get_title() == (f'{CLASSES[p]} ({interp.probs[idx[0], p]:.2f})\n{CLASSES[a]} / '
                                          f'{losses[0]:.2f}')
    plt.close('all')


def test_it_refuses_outputs_that_are_not_class_scores():
    with pytest.raises(ValueError, match=r'takes \(items, classes\) probabilities'):
        ClassificationInterpretation(torch.rand(4, 3, 2), torch.zeros(4), None, torch.zeros(4))
