from pathlib import Path
from setuptools import setup, find_packages

setup(
    name="miniai",
    version="0.1.0",
    description="A small, fast, callback-driven training library for PyTorch in the style of the fast.ai course",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["miniai", "miniai.*"]),
    python_requires=">=3.10",
    # Lower bounds only: Colab and clusters bring their own torch, and an upper cap would make pip replace it. The
    # Makefile pins exact versions for reproducible runs. torch 2.3: torch.amp.GradScaler('cuda') and torch.uint32
    # (NumPy's generator state in checkpoints); safetensors 0.6 stores uint32 tensors; torchvision 0.18 goes with
    # torch 2.3 (the course's code imports it).
    install_requires=[
        "torch>=2.3",
        "torchvision>=0.18",
        "fastcore>=1.5",
        "torcheval>=0.0.7",
        "datasets>=2.14",
        "matplotlib>=3.7",
        "fastprogress>=1.0.3",
        "numpy",
        "safetensors>=0.6",
    ],
    extras_require={
        # the tests also call torch.is_autocast_enabled(device), new in torch 2.4
        "dev": ["torch>=2.4", "pytest>=7", "nbclient>=0.9", "nbformat>=5.9", "ipykernel>=6", "tensorboard>=2.14",
                "accelerate>=0.30", "fvcore>=0.1.5",
                "ipywidgets>=8",  # progress bars in the notebooks (datasets' tqdm warns without it)
                # the trackers' tests: `wandb leet inspect` reads offline runs back; MLflow to a local folder
                "wandb>=0.31", "mlflow-skinny>=2.10"],
        # experiment trackers (WandBCB, MLflowCB, `miniai train --log wandb|mlflow`); sqlalchemy and alembic: MLflow's
        # default local store is an SQLite file
        "wandb": ["wandb>=0.20"],
        "mlflow": ["mlflow-skinny>=2.10", "sqlalchemy>=2", "alembic>=1.8"],
        # scipy: bench.fid compares FID with the course's scipy.linalg.sqrtm (the library itself does not need it)
        "bench": ["fastai>=2.7", "lightning>=2.1", "torchinfo>=1.8", "fvcore>=0.1.5", "scipy>=1.9"],
    },
    entry_points={"console_scripts": ["miniai=miniai.__main__:main"]},
)
