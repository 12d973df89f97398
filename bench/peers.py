"""fastai and Lightning doing the overhead benchmark's job (one epoch, train and valid, the same model, data,
SGD optimizer and learning rate), each the way its users would write it; None for a peer that is not installed."""
from __future__ import annotations

import contextlib
import io
import warnings

import torch
import torch.nn.functional as F


def _fastai():
    try:
        from fastai.data.core import DataLoaders as FastaiDataLoaders
        from fastai.learner import Learner as FastaiLearner
        from fastai.metrics import accuracy
        from fastai.optimizer import OptimWrapper
    except ImportError: return None
    from functools import partial

    def fastai_loop(model, dls, lr):
        fdls = FastaiDataLoaders(dls.train, dls.valid, device=torch.device('cpu'))
        learn = FastaiLearner(fdls, model, loss_func=F.cross_entropy, lr=lr, metrics=accuracy,
                              opt_func=partial(OptimWrapper, opt=torch.optim.SGD))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            learn.fit(1, lr=lr)
        return float(learn.recorder.values[-1][-1])
    return fastai_loop


def _lightning():
    try: import lightning as L
    except ImportError: return None

    class Lit(L.LightningModule):
        def __init__(self, model, lr):
            super().__init__()
            self.model, self.lr = model, lr
            self.correct, self.n = torch.zeros((), dtype=torch.long), 0

        def training_step(self, batch, i):
            x, y = batch
            preds = self.model(x)
            loss = F.cross_entropy(preds, y)
            self.log('train_loss', loss, on_step=False, on_epoch=True)
            self.log('train_acc', (preds.argmax(1) == y).float().mean(), on_step=False, on_epoch=True)
            return loss

        def validation_step(self, batch, i):
            x, y = batch
            preds = self.model(x)
            self.log('valid_loss', F.cross_entropy(preds, y))
            self.correct += (preds.argmax(1) == y).sum()
            self.n += len(y)

        def configure_optimizers(self): return torch.optim.SGD(self.parameters(), lr=self.lr)

    def lightning_loop(model, dls, lr):
        lit = Lit(model, lr)
        trainer = L.Trainer(max_epochs=1, accelerator='cpu', devices=1, logger=False, enable_checkpointing=False,
                            enable_model_summary=False, num_sanity_val_steps=0, enable_progress_bar=True)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter('ignore')
            trainer.fit(lit, train_dataloaders=dls.train, val_dataloaders=dls.valid)
        return lit.correct.item() / lit.n
    return lightning_loop


fastai_loop, lightning_loop = _fastai(), _lightning()
