"""Export for inference: `learn.export(folder)` and, in a fresh process without the model's class,
`load_exported(folder)` gives the Learner's model's outputs for batches of any size; a model torch.export cannot take
falls back to its weights, saying why; and a .pt2 that asks torch to unpickle or run anything is refused."""
import io
import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from miniai import load_exported
from miniai.datasets import DataLoaders
from miniai.tools.export import ExportError, check_program
from miniai.data.loader import TensorDataLoader
from miniai.learner import TrainLearner

ROOT = Path(__file__).resolve().parents[1]


def learner(model):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(80, 1, 12, 12, generator=g), torch.randint(0, 3, (80,), generator=g)
    dls = DataLoaders(TensorDataLoader(x[:48], y[:48], 16, shuffle=True, seed=0), TensorDataLoader(x[48:], y[48:], 16))
    dls.mean, dls.std, dls.classes = 0.25, 0.5, ['cat', 'dog', 'emu']
    learn = TrainLearner(model, dls, F.cross_entropy, lr=0.1)
    learn.fit(1)
    return learn


class Net(nn.Module):
    "A model defined here: the fresh process cannot import it, so loading the program must not need it."
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Dropout(0.3))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    def forward(self, x): return self.head(self.body(x))


class Branchy(Net):
    "Python control flow on a tensor's value: a graph cannot hold it."
    def forward(self, x):
        x = self.body(x)
        if x.mean() > 0: x = x * 2
        return self.head(x)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    learn = learner(Net())
    folder = learn.export(tmp_path_factory.mktemp('export') / 'net')
    return learn, folder


LOAD = """
import sys, json
from safetensors.torch import load_file, save_file
from miniai import load_exported
m = load_exported(sys.argv[1])
xs = load_file(sys.argv[2])
save_file({k: m(x).contiguous() for k, x in xs.items()}, sys.argv[3])
print(json.dumps({'classes': m.classes, 'shape': m.input_shape, 'net_known': 'test_export' in sys.modules}))
"""


def test_the_export_loads_in_a_fresh_process_and_gives_the_models_outputs(exported, tmp_path):
    learn, folder = exported
    assert sorted(p.name for p in folder.iterdir()) == ['miniai.json', 'model.pt2']
    xs = {'one': torch.randn(1, 1, 12, 12), 'seven': torch.randn(7, 1, 12, 12), 'valid': learn.dls.valid.x}
    save_file(xs, tmp_path / 'x.safetensors')
    r = subprocess.run([sys.executable, '-c', LOAD, folder, tmp_path / 'x.safetensors', tmp_path / 'y.safetensors'],
                       capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info == {'classes': ['cat', 'dog', 'emu'], 'shape': [1, 12, 12], 'net_known': False}
    ys = load_file(tmp_path / 'y.safetensors')
    learn.model.eval()
    with torch.no_grad():
        for k, x in xs.items(): assert torch.allclose(ys[k], learn.model(x), atol=1e-6), k
    assert r.stderr == '', 'loading printed nothing'


def test_export_leaves_the_learners_model_as_it_was(exported):
    learn, folder = exported
    learn.model.train()
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    learn.export(folder)
    assert learn.model.training and all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())


def test_the_preprocessing_facts_and_predict(exported):
    learn, folder = exported
    meta = json.loads((folder / 'miniai.json').read_text())
    assert (meta['kind'], meta['input_shape'], meta['mean'], meta['std']) == ('program', [1, 12, 12], 0.25, 0.5)
    m = load_exported(folder)
    pixels = torch.randint(0, 256, (5, 12, 12), dtype=torch.uint8)  # grey images without their channel
    x = m.normalize(pixels)
    assert x.shape == (5, 1, 12, 12) and torch.allclose(x, (pixels[:, None] / 255 - 0.25) / 0.5)
    p = m.predict(x)
    assert p.label == learn.predict(x).label and torch.allclose(p.probs, learn.predict(x).probs, atol=1e-6)


def test_a_model_torch_export_cannot_take_falls_back_to_its_weights_saying_why(tmp_path):
    learn = learner(Branchy())
    with pytest.warns(UserWarning, match=r"learn.export: torch.export could not take Branchy \(its forward branches "
                                         r"on the values of a tensor, which a graph cannot hold; .*load_exported\("):
        folder = learn.export(tmp_path / 'b')
    assert sorted(p.name for p in folder.iterdir()) == ['miniai.json', 'weights.safetensors']
    with pytest.raises(ExportError, match=r'holds the weights of a test_export.Branchy .*pass model='):
        load_exported(folder)
    m = load_exported(folder, model=Branchy())
    x = torch.randn(4, 1, 12, 12)
    with torch.no_grad(): assert torch.equal(m(x), learn.model.eval()(x))
    with pytest.raises(ExportError, match='do not fit the Linear given'): load_exported(folder, model=nn.Linear(2, 2))


# -- what a .pt2 may ask of torch.export.load -------------------------------------------------------------------------
def tampered(folder: Path, change, add=None) -> bytes:
    "The exported archive with `change(name, bytes)` applied to each member, and the file `add` (name under the root)."
    src, out = zipfile.ZipFile(folder / 'model.pt2'), io.BytesIO()
    with zipfile.ZipFile(out, 'w') as z:
        for n in src.namelist(): z.writestr(n, change(n, src.read(n)))
        if add: z.writestr(src.namelist()[0].split('/')[0] + '/' + add[0], add[1])
    return out.getvalue()


def json_edit(suffix, f):
    def change(n, data):
        if not n.endswith(suffix): return data
        d = json.loads(data)
        f(d)
        return json.dumps(d).encode()
    return change


def first_node(d): return d['graph_module']['graph']['nodes'][0]


CASES = {
    'a pickled weight': (json_edit('model_weights_config.json',
                                   lambda d: next(iter(d['config'].values())).update(use_pickle=True)), 'are pickled'),
    'a pickled constant': (json_edit('model_constants_config.json', lambda d: d['config'].update(
        c={'path_name': 'opaque_obj_0', 'use_pickle': False})), 'are pickled'),
    'example inputs': (lambda n, d: b'\x80\x02}q\x00.' if n.endswith('sample_inputs/model.pt') else d,
                       'example inputs'),
    'guards code': (json_edit('models/model.json', lambda d: d.update(guards_code=["__import__('os')"])),
                    'guards code'),
    'a call of torch.os.system': (json_edit('models/model.json', lambda d: first_node(d).update(
        target='torch.os.system')), "not aten ones: ['torch.os.system']"),
    'a sympy expression that evaluates': (json_edit('models/model.json', lambda d: d['range_constraints'].update(
        {"__import__('os').system('true')": {'min_val': 1, 'max_val': None}})), 'symbolic expressions'),
    'compiled code': (lambda n, d: d, "unexpected files ['model/data/aotinductor/model/x.so']",
                      ('data/aotinductor/model/x.so', b'\x7fELF')),
}


@pytest.mark.parametrize('case', list(CASES))
def test_a_program_that_asks_torch_to_run_anything_is_refused(exported, case, tmp_path):
    _, folder = exported
    change, why, *add = CASES[case]
    data = tampered(folder, change, *add)
    with pytest.raises(ExportError, match=r'refused to load: .*' + why.replace('[', r'\[').replace(']', r'\]')):
        check_program(data, 'model.pt2')
    bad = tmp_path / 'bad'
    bad.mkdir()
    (bad / 'model.pt2').write_bytes(data)
    (bad / 'miniai.json').write_text((folder / 'miniai.json').read_text())
    with pytest.raises(ExportError, match='refused to load'): load_exported(bad)


def test_the_untouched_program_passes_and_garbage_is_refused(exported, tmp_path):
    _, folder = exported
    check_program((folder / 'model.pt2').read_bytes(), 'model.pt2')
    with pytest.raises(ExportError, match='not a .pt2 archive'): check_program(b'not a zip', 'x.pt2')
    with pytest.raises(ExportError, match='no readable miniai.json'): load_exported(tmp_path)


def test_a_program_another_torch_wrote_gets_an_error_naming_both_torches(exported, tmp_path, monkeypatch):
    "A torch.export archive is read only by the torch that wrote it: the wheel smoke met torch 2.3 reading 2.14's."
    _, folder = exported
    assert json.loads((folder / 'miniai.json').read_text())['torch'] == torch.__version__
    def unreadable(f): raise KeyError("There is no item named 'version' in the archive")
    monkeypatch.setattr(torch.export, 'load', unreadable)
    with pytest.raises(ExportError, match=rf'torch {re.escape(torch.__version__)} cannot read this program, written by '
                                          rf'torch {re.escape(torch.__version__)} \(KeyError'):
        load_exported(folder)
