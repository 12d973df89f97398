"""Using a trained model on new images, as a user has them: `learn.predict` on a file's path, a PIL image, uint8 pixels
as decoded and normalised floats (a float of another size resized with a warning), `dls.test_dl` for `get_preds` and
the interpretation, errors that name an un-normalised or wrong-dtype input, and an export that brings its
preprocessing (a fresh process predicting a PNG and a JPEG as `learn.predict` does). The images are Fashion-MNIST
written as PNGs and JPEGs of several sizes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn, optim
from torchvision.io import decode_image

from miniai import load_exported
from miniai.data.decode import resize_cover
from miniai.data.fashion import fashion_arrays, find_fashion_mnist
from miniai.data.normalise import Normalise
from miniai.datasets import DataLoaders
from miniai.learner import TrainLearner
from miniai.tools.inference import Prediction
from miniai.tools.interpret import ClassificationInterpretation

pytestmark = [pytest.mark.skipif(find_fashion_mnist() is None, reason='Fashion-MNIST is not installed (make data)'),
              pytest.mark.filterwarnings('ignore:The image decoding and encoding capabilities of TorchVision')]
ROOT = Path(__file__).resolve().parents[1]
LABELS = {'top': 0, 'trouser': 1, 'boot': 9}  # three Fashion-MNIST classes, easy to tell apart
SIZE = 24  # the training size: every image is resized to cover it


def write_images(folder: Path, x: torch.Tensor, y: torch.Tensor, names: list[str], k: int) -> list[Path]:
    """Images `x` in class folders: every other one a PNG at 28x28, the rest JPEGs scaled to a size of their own
    (`k` varies the sizes), so the folder mixes formats and sizes."""
    files = []
    for i, (img, c) in enumerate(zip(x.numpy(), y.tolist())):
        d = folder / names[c]
        d.mkdir(parents=True, exist_ok=True)
        im = Image.fromarray(img)
        if i % 2: f, im = d / f'{i}.jpg', im.resize((30 + (i + k) % 9, 33 + (i * k) % 7))
        else: f = d / f'{i}.png'
        im.save(f, quality=95) if f.suffix == '.jpg' else im.save(f)
        files.append(f)
    return files


def pick(split: str, n: int, start: int = 0):
    "`n` images of each of the three classes from a Fashion-MNIST split, labels 0..2."
    x, y = fashion_arrays()[split]
    idx = torch.cat([(y == lab).nonzero()[start:start + n, 0] for lab in LABELS.values()])
    new_y = torch.tensor([list(LABELS.values()).index(int(v)) for v in y[idx]])
    return x[idx], new_y


def image_folders(root, n_train: int, n_valid: int) -> list:
    """`root/data/train` and `root/data/valid`, class folders of PNGs and JPEGs (`n_train`, `n_valid` a class), with
    the image cache under `root`; returns the class names."""
    names = list(LABELS)
    write_images(root / 'data' / 'train', *pick('train', n_train), names, 1)
    write_images(root / 'data' / 'valid', *pick('test', n_valid), names, 2)
    return names


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A tiny CNN trained on a folder of PNGs and JPEGs; a folder of new images (PNGs 56x56, JPEGs of other sizes)."
    root = tmp_path_factory.mktemp('imgs')
    mp = pytest.MonkeyPatch()
    mp.setenv('MINIAI_CACHE', str(root / 'cache'))
    names = image_folders(root, 30, 8)
    x, y = pick('test', 4, start=20)
    new = write_images(root / 'new', torch.stack([torch.from_numpy(np.array(Image.fromarray(i.numpy()).resize(
        (56, 56)))) for i in x]), y, names, 3)
    dls = DataLoaders.from_folder(root / 'data', size=SIZE, bs=16, device='cpu', seed=0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 3))
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.01, opt_func=optim.AdamW)
    learn.fit(3)
    yield learn, root, new, y
    mp.undo()


def by_hand(learn, img: torch.Tensor) -> torch.Tensor:
    "The probabilities for uint8 pixels [1, H, W], made into the model's input by hand: resize, normalise, forward."
    x = Normalise(learn.dls.mean, learn.dls.std, channels=1).encode(resize_cover(img, (SIZE, SIZE)))
    with torch.no_grad(): return learn.model.eval()(x[None]).softmax(1)[0]


def test_predict_takes_a_file_a_pil_image_uint8_pixels_and_floats(trained):
    learn, _, new, _ = trained
    png, jpg = new[0], new[1]
    for f in (png, jpg):
        p = learn.predict(f)
        want = by_hand(learn, decode_image(str(f)))
        assert isinstance(p, Prediction) and p.label == learn.dls.classes[int(want.argmax())]
        assert isinstance(p.prob, float) and torch.allclose(p.probs, want, atol=1e-5), f.name
        assert torch.allclose(learn.predict(str(f)).probs, want, atol=1e-5), 'a str as well as a Path'
        assert torch.allclose(learn.predict(decode_image(str(f))).probs, want, atol=1e-5), 'uint8 as decoded'
        # PIL decodes JPEGs with its own libjpeg build: a level or so apart
        assert torch.allclose(learn.predict(Image.open(f)).probs, want, atol=1e-5 if f == png else 0.02), 'PIL'
    img = decode_image(str(png))
    x = Normalise(learn.dls.mean, learn.dls.std, channels=1).encode(resize_cover(img, (SIZE, SIZE)))
    assert torch.allclose(learn.predict(x).probs, by_hand(learn, img), atol=1e-5), 'an already-normalised float'
    assert torch.allclose(learn.predict(img[0].numpy()).probs, by_hand(learn, img), atol=1e-5), 'a numpy [H, W]'
    greys = torch.stack([decode_image(str(f))[0] for f in (png, new[2])])  # [N, H, W]: grey images, no channel
    assert learn.predict(greys).label == [learn.predict(png).label, learn.predict(new[2]).label], 'a batch'
    rgb = Image.open(png).convert('RGB')  # colour for a grey model: made grey, as its luminance
    assert learn.predict(rgb).label == learn.predict(png).label


def test_one_item_gives_one_prediction_and_a_list_gives_a_list(trained):
    learn, _, new, _ = trained
    many = learn.predict(new[:3])
    assert isinstance(many, list) and len(many) == 3 and all(isinstance(p, Prediction) for p in many)
    for f, p in zip(new, many):
        one = learn.predict(f)
        assert p.label == one.label and torch.allclose(p.probs, one.probs, atol=1e-6)
    batch = learn.predict(learn.dls.valid.normalise(learn.dls.valid.x[:4]))
    assert isinstance(batch, Prediction) and len(batch.label) == 4, 'a batch tensor: one Prediction of lists'


def test_a_float_tensor_of_another_size_is_resized_with_a_warning_naming_both_sizes(trained):
    learn, _, new, _ = trained
    img = decode_image(str(new[0]))  # 56x56
    big = Normalise(learn.dls.mean, learn.dls.std, channels=1).encode(img)
    with pytest.warns(UserWarning, match=r'^learn\.predict: the float tensor is 56x56 \(HxW\) but the model was '
                                         r'trained on 24x24 images: resized to cover 24x24 and centre-cropped, as the '
                                         r'training images were \(pass files, PIL images or uint8 pixels to have them '
                                         r'resized without this warning\)$'):
        p = learn.predict(big)
    assert torch.allclose(p.probs, by_hand(learn, img), atol=0.02), 'resized, not mispredicted'


def test_wrong_dtypes_are_named_before_channels_or_features(trained):
    learn, _, new, _ = trained
    with pytest.raises(TypeError, match=r'^learn\.predict: got a torch\.int64 tensor; it takes uint8 pixels \(0-255, '
                                        r'as decoded, which it normalises\) or already-normalised floats: convert '
                                        r'pixels with x\.to\(torch\.uint8\)$'):
        learn.predict(decode_image(str(new[0])).long())
    raw = learn.dls.valid.x[:4]  # uint8 pixels, as the loaders hold them
    uint8 = (r"^the model's input is uint8, pixels that were never normalised \(what decode_image and dls\.valid\.x "
             r"hold\), but its weights are torch\.float32: normalise them first\. learn\.predict\(x\) does it for you "
             r"\(and takes files and PIL images\); for a batch, dls\.normalise\(x\) gives what the loaders give the "
             r"model\. \(.*\)$")
    with pytest.raises(TypeError, match=uint8): learn.get_preds(dl=[(raw,)])
    linear = TrainLearner(nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 3)), learn.dls, F.cross_entropy)
    with pytest.raises(TypeError, match=uint8) as e: linear.get_preds(dl=[(raw,)])
    assert 'features' not in str(e.value).split('. (')[0]
    with pytest.raises(TypeError, match=r"^the model's input is torch\.float64 but its weights are torch\.float32: "
                                        r"convert it \(x\.to\(torch\.float32\)\)\."):
        learn.get_preds(dl=[(learn.dls.normalise(raw).double(),)])
    assert torch.allclose(learn.get_preds(dl=[(learn.dls.normalise(raw),)])[0],
                          learn.get_preds(dl=[(learn.dls.valid.normalise(raw),)])[0]), 'dls.normalise: the loaders\''


def test_test_dl_of_a_folder_files_and_tensors_for_get_preds_and_the_interpretation(trained):
    learn, root, new, y = trained
    dl = learn.dls.test_dl(root / 'new')  # class folders named as the classes: labelled
    assert sorted(dl.items) == sorted(map(str, new)), 'every image below the folder, named'
    preds, targs = learn.get_preds(dl=dl, act=lambda o: o.softmax(1))
    for name, p in zip(dl.items, preds):
        assert torch.allclose(p, learn.predict(name).probs, atol=1e-5), name
    assert targs.tolist() == [learn.dls.classes.index(Path(n).parent.name) for n in dl.items]
    interp = ClassificationInterpretation.from_learner(learn, dl)
    assert interp.confusion_matrix().sum() == len(new)
    loose = learn.dls.test_dl(new[:3])  # files: no labels
    preds, targs = learn.get_preds(dl=loose)
    assert targs is None and len(preds) == 3 and loose.items == [str(f) for f in new[:3]]
    with pytest.raises(ValueError, match=r"needs each item's true class, and this test_dl has none"):
        ClassificationInterpretation.from_learner(learn, loose)
    pixels = learn.dls.test_dl(torch.stack([decode_image(str(f)) for f in new[::2]]), bs=2)  # uint8, 56x56
    assert len(pixels) == 3 and torch.allclose(learn.get_preds(dl=pixels)[0], learn.get_preds(
        dl=learn.dls.test_dl(new[::2]))[0], atol=1e-6)


EXPORTED = """
import json, sys
import miniai.tools.export as ex
m = ex.load_exported(sys.argv[1])
out = {}
for f in sys.argv[2:]:
    p = m.predict(f)
    out[f] = [p.label, p.prob, p.probs.tolist()]
both = m.predict(sys.argv[2:])
out['list'] = [q.label for q in both]
print(json.dumps({'preds': out, 'loaded': sorted(k for k in sys.modules if k.startswith('test'))}))
"""


def test_the_export_brings_its_preprocessing_to_a_fresh_process(trained, tmp_path):
    learn, root, new, _ = trained
    folder = learn.export(tmp_path / 'exp')
    meta = json.loads((folder / 'miniai.json').read_text())
    assert (meta['resize'], meta['input_shape'], meta['dynamic_size']) == ('cover', [1, SIZE, SIZE], True)
    files = [str(new[0]), str(new[1])]  # a PNG and a JPEG, neither of the training size
    r = subprocess.run([sys.executable, '-c', EXPORTED, folder, *files], capture_output=True, text=True, timeout=300,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got['loaded'] == [], 'no test code in the fresh process'
    for f in files:
        want = learn.predict(f)
        label, prob, probs = got['preds'][f]
        assert label == want.label and prob == pytest.approx(want.prob, abs=1e-5)
        assert torch.allclose(torch.tensor(probs), want.probs, atol=1e-5)
    assert got['preds']['list'] == [learn.predict(f).label for f in files]
    m = load_exported(folder)
    assert isinstance(m.predict(new[0]), Prediction) and m.predict(new[0]).label == learn.predict(new[0]).label
    # any batch size and, this model allowing it, any image size
    assert m(torch.randn(5, 1, SIZE, SIZE)).shape == (5, 3) and m(torch.randn(2, 1, 40, 31)).shape == (2, 3)


def test_the_exports_shape_and_dtype_errors_say_what_to_pass(trained, tmp_path):
    learn, *_ = trained
    fixed = nn.Sequential(nn.Flatten(), nn.Linear(SIZE * SIZE, 3))  # a linear model: one image size only
    fixed_learn = TrainLearner(fixed, learn.dls, F.cross_entropy)
    m = load_exported(fixed_learn.export(tmp_path / 'fixed'))
    assert m.meta['dynamic_size'] is False
    with pytest.raises(ValueError, match=r'^the exported model takes 1x24x24 \(CxHxW\) inputs, got a batch of shape '
                                         r'\(1, 1, 100, 100\): use \.predict\(item\), which takes files, PIL images '
                                         r'and uint8 pixels and resizes and normalises them as the training images '
                                         r'were$'):
        m(torch.randn(1, 1, 100, 100))
    with pytest.raises(ValueError, match=r'^the exported model takes normalised float32 batches, but got uint8 pixels '
                                         r'that were never normalised: use \.predict\(item\)'):
        m(torch.zeros(1, 1, SIZE, SIZE, dtype=torch.uint8))
    assert m.predict(torch.zeros(100, 100, dtype=torch.uint8)).label in learn.dls.classes, 'predict resizes'


@pytest.mark.cuda
def test_predict_and_a_test_dl_with_the_model_on_a_gpu(trained):
    "The items are made on the CPU and cross to the model's device as uint8 or floats; the answer is the CPU's."
    from miniai.learner import DeviceCB
    learn, _, new, _ = trained
    cpu, cpu_preds = learn.predict(new[0]), learn.get_preds(dl=learn.dls.test_dl(new[:4]))[0]
    dev = DeviceCB('cuda')
    learn.cbs.append(dev)
    try:
        p = learn.predict(new[0])
        preds = learn.get_preds(dl=learn.dls.test_dl(new[:4]))[0]
    finally:
        learn.cbs.remove(dev)
        learn.model.cpu()
    assert p.label == cpu.label and torch.allclose(p.probs, cpu.probs, atol=1e-4)
    assert torch.allclose(preds, cpu_preds, atol=1e-4)
