"""The plain training loop that the `Learner` replaces: a dataset, data loaders, a `fit` and its report."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

__all__ = ['accuracy', 'report', 'Dataset', 'fit', 'get_dls']


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    "Fraction of rows of `out` whose arg-max equals the target in `yb`."
    return (out.argmax(dim=1) == yb).float().mean()


def report(loss, preds: torch.Tensor, yb: torch.Tensor) -> None:
    "Print a batch's loss and accuracy to two decimals."
    print(f'{float(loss):.2f}, {float(accuracy(preds, yb)):.2f}')


class Dataset:
    "Pairs of (x, y) taken from two sequences of the same length."
    def __init__(self, x, y):
        if len(x) != len(y): raise ValueError(f'Dataset: x has {len(x)} items but y has {len(y)}')
        self.x, self.y = x, y
    def __len__(self) -> int: return len(self.x)
    def __getitem__(self, i): return self.x[i], self.y[i]


def fit(epochs: int, model, loss_func, opt, train_dl, valid_dl):
    "Train `model` for `epochs`, printing validation loss and accuracy after each; returns the last pair."
    for epoch in range(epochs):
        model.train()
        for xb, yb in train_dl:
            loss = loss_func(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            tot_loss, tot_acc, count = 0., 0., 0
            for xb, yb in valid_dl:
                pred = model(xb)
                n = len(xb)
                count += n
                tot_loss += loss_func(pred, yb).item() * n
                tot_acc += accuracy(pred, yb).item() * n
        print(epoch, tot_loss / count, tot_acc / count)
    return tot_loss / count, tot_acc / count


def get_dls(train_ds, valid_ds, bs: int, **kwargs):
    "A shuffled training `DataLoader` and a validation one with twice the batch size."
    return (DataLoader(train_ds, batch_size=bs, shuffle=True, **kwargs),
            DataLoader(valid_ds, batch_size=bs * 2, **kwargs))
