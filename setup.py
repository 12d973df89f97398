"""Packaging for miniai. The distribution is `miniai-learner` on PyPI (the name `miniai` there belongs to another
project); the import name stays `miniai`. `pyproject.toml` only names the build system."""
import re
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
VERSION = re.search(r"^__version__ = '([^']+)'", (HERE / 'miniai' / '__init__.py').read_text(), re.M).group(1)

# Each extra is named for what it brings; `dev` is what the test suite needs.
EXTRAS = {
    'timm': ['timm>=0.9'],                 # backbones from timm
    'wandb': ['wandb>=0.20'],              # Weights & Biases logging (WandBCB, `miniai train --log wandb`)
    # MLflow tracking (MLflowCB); sqlalchemy and alembic: MLflow's default local store is an SQLite file
    'mlflow': ['mlflow-skinny>=2.10', 'sqlalchemy>=2', 'alembic>=1.8'],
    'accelerate': ['accelerate>=0.30'],    # AccelerateCB (Hugging Face Accelerate)
    'tensorboard': ['tensorboard>=2.14'],  # TensorBoardCB
    # peers measured side by side; scipy: bench.fid compares FID with the course's scipy.linalg.sqrtm
    'bench': ['fastai>=2.7', 'lightning>=2.1', 'torchinfo>=1.8', 'fvcore>=0.1.5', 'scipy>=1.9'],
    'docs': ['mkdocs>=1.6', 'mkdocs-material>=9.5', 'mkdocstrings[python]>=0.26', 'mkdocs-jupyter>=0.25'],
}
EXTRAS['dev'] = [
    'torch>=2.4',  # the tests also call torch.is_autocast_enabled(device), new in torch 2.4
    'pytest>=7', 'pytest-xdist>=3.5', 'nbclient>=0.9', 'nbformat>=5.9', 'ipykernel>=6', 'fvcore>=0.1.5',
    'ipywidgets>=8',  # progress bars in the notebooks (datasets' tqdm warns without it)
    'build>=1.2',     # scripts/wheel_smoke.sh builds the wheel and the sdist
    'pyright==1.1.414',  # `make typecheck` (its wheel brings its own JS, Node.js runs it); pinned: a release may add checks
    *EXTRAS['tensorboard'], *EXTRAS['accelerate'], *EXTRAS['timm'],  # vision_learner's timm path is tested too
    # the trackers' tests: `wandb leet inspect` reads offline runs back; MLflow to a local folder
    'wandb>=0.31', 'mlflow-skinny>=2.10',
]

setup(
    name='miniai-learner',
    version=VERSION,
    description='A small, fast, callback-driven training library for PyTorch in the style of the fast.ai course',
    long_description=(HERE / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    author='The miniai authors',
    license='MIT',
    license_files=['LICENSE'],
    url='https://github.com/REPLACE-ME/miniai-learner',  # placeholder: no public home yet
    project_urls={
        'Documentation': 'https://REPLACE-ME.github.io/miniai-learner/',  # placeholder
        'Source': 'https://github.com/REPLACE-ME/miniai-learner',          # placeholder
        'Issues': 'https://github.com/REPLACE-ME/miniai-learner/issues',   # placeholder
    },
    keywords=['pytorch', 'deep learning', 'training loop', 'callbacks', 'fastai', 'learner'],
    classifiers=[
        'Development Status :: 3 - Alpha',
        'Intended Audience :: Developers',
        'Intended Audience :: Education',
        'Intended Audience :: Science/Research',
        'Operating System :: OS Independent',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3 :: Only',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Framework :: Jupyter',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Topic :: Software Development :: Libraries :: Python Modules',
    ],
    packages=find_packages(include=['miniai', 'miniai.*']),
    package_data={'miniai': ['py.typed']},  # PEP 561: the package's annotations are for its users' type checkers too
    python_requires='>=3.10',
    # Lower bounds only: Colab and clusters bring their own torch, and an upper cap would make pip replace it. The
    # Makefile pins exact versions for reproducible runs. torch 2.3: torch.amp.GradScaler('cuda') and torch.uint32
    # (NumPy's generator state in checkpoints); safetensors 0.6 stores uint32 tensors; torchvision 0.18 goes with
    # torch 2.3 (the course's code imports it). Tested with scripts/wheel_smoke.sh (SMOKE_TORCH): 2.3.1 trains,
    # exports fall back to weights there; 2.11.0 and 2.14.1 pass the whole smoke.
    install_requires=[
        'torch>=2.3',
        'torchvision>=0.18',
        'fastcore>=1.5',
        'torcheval>=0.0.7',
        'datasets>=2.14',
        'matplotlib>=3.7',
        # 1.1 and later depend on python-fasthtml (and through it uvicorn, starlette...): a web server for a bar
        'fastprogress>=1.0.3,<1.1',
        'numpy',
        'safetensors>=0.6',
        'filelock>=3.12',
    ],
    extras_require=EXTRAS,
    entry_points={'console_scripts': ['miniai=miniai.__main__:main']},
    zip_safe=False,
)
