"""The fast in-memory loader, `TensorDataLoader`: batches of tensors taken by indexing, a seeded order that checkpoints
keep, sharding over ranks, and uint8 images normalised per batch where the data lives (`Normalise`)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import TensorDataset

from ..core.devices import pinned_rows, resolve_device
from .normalise import Normalise

__all__ = ['TensorDataLoader', 'subset']


class TensorDataLoader:
    """Batches `(x[idx], y[idx])` of tensors held in memory, taken by indexing, not item by item.

    Every batch is a fresh tensor, so changing it in place never changes the data. With `mean` and `std` (of [0, 1]
    pixels, one per channel or one for all), `x` holds uint8 images [N, C, ...] and each batch becomes normalised
    float32, `(x / 255 - mean) / std`, where the data lives: the set costs its pixel bytes, not 4x. When shuffled,
    each epoch gets a new order from the loader's own generator (`seed`, or drawn once from torch's global RNG at
    construction, so `set_seed` makes it reproducible); `state_dict` holds that generator and the epochs drawn, to
    repeat the coming orders. `device` keeps the whole set there ('cuda' means this process's GPU under torchrun).
    With `world_size` > 1, every rank (all given the same seed) draws the same permutation and takes its interleaved
    slice `rank::world_size` of the first `world_size * (n // world_size)` items: disjoint parts, equally many batches
    on every rank, the last `n % world_size` items of each epoch's order left out.

    A batch's tensors are all where the data is, unless whoever trains elsewhere asks for delivery there
    (`deliver_to(device)`: `DeviceCB` does so for each epoch of its fit). `pin_memory` (CPU-held data, CUDA model)
    gathers batches into pinned memory, so that their copy to the GPU does not make the CPU wait; delivered to the
    GPU, uint8 images cross as uint8 (a quarter of the bytes) and are normalised there."""
    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int = 1024, shuffle: bool = False,
                 drop_last: bool = False, seed: int | None = None, device: str | torch.device | None = None, rank: int = 0,
                 world_size: int = 1, pin_memory: bool = False, mean: float | Sequence[float] | torch.Tensor | None = None,
                 std: float | Sequence[float] | torch.Tensor | None = None) -> None:
        if len(x) != len(y): raise ValueError(f'TensorDataLoader: {len(x)} inputs but {len(y)} targets')
        if bs < 1: raise ValueError(f'TensorDataLoader: bs must be >= 1, got {bs}')
        if not 0 <= rank < world_size: raise ValueError(f'TensorDataLoader: rank {rank} not in [0, {world_size})')
        if device is not None:
            device = resolve_device(device)  # 'cuda' under torchrun is this rank's GPU, not cuda:0
            x, y = x.to(device), y.to(device)
        if pin_memory and (x.device.type != 'cpu' or not torch.cuda.is_available()):
            raise ValueError(f'TensorDataLoader: pin_memory=True is for CPU-held data trained on a CUDA GPU; the data '
                             f'is on {x.device} and torch sees {"a" if torch.cuda.is_available() else "no"} CUDA GPU')
        self.x, self.y, self.bs, self.shuffle, self.drop_last = x, y, bs, shuffle, drop_last
        self.pin_memory, self._deliver = pin_memory, None
        self.rank, self.world_size = rank, world_size
        self.dataset = TensorDataset(x, y)
        self.set_normalisation(mean, std)
        if seed is None and shuffle: seed = int(torch.randint(0, 2 ** 62, (1,)).item())
        self.seed, self.epochs_drawn = seed, 0
        self.gen = torch.Generator().manual_seed(seed or 0)
        self._epoch_gen = None  # the generator's state before the latest epoch's order was drawn

    def set_normalisation(self, mean: float | Sequence[float] | torch.Tensor | None, std: float | Sequence[float] | torch.Tensor | None) -> None:
        "Normalise uint8 batches with `mean` and `std` ([0, 1] pixels, one per channel or one for all; both None: no)."
        self.norm = None
        if mean is None and std is None: return
        if mean is None or std is None: raise ValueError('TensorDataLoader: give both mean and std, or neither')
        if self.x.dtype != torch.uint8 or self.x.dim() < 2:
            raise ValueError(f'TensorDataLoader: mean/std normalise uint8 images [N, C, ...]; x is {self.x.dtype} '
                             f'{tuple(self.x.shape)} (normalise float data once, beforehand)')
        try: self.norm = Normalise(mean, std, channels=self.x.shape[1], spatial_dims=self.x.dim() - 2)
        except ValueError as e: raise ValueError(f'TensorDataLoader: {e}') from None

    mean = property(lambda self: None if self.norm is None else self.norm.mean, doc="Per-channel mean, of [0, 1].")
    std = property(lambda self: None if self.norm is None else self.norm.std, doc="Per-channel std, of [0, 1].")
    batch_size = property(lambda self: self.bs)
    device = property(lambda self: self.x.device, doc="Where the data is, and its batches unless delivered elsewhere.")
    delivery = property(lambda self: self._deliver, doc="Where batches are delivered (None: where the data is).")

    def deliver_to(self, device: str | torch.device | None = None) -> None:
        """Hand out batches on `device` from now on; None (or the data's own device): where the data is. For whoever
        trains on another device than the data's (`DeviceCB` calls it at each epoch of its fit and undoes it after)."""
        dev = None if device is None else torch.device(resolve_device(device))
        self._deliver = None if dev == self.x.device else dev

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        """The uint8 images `xb` as this loader's batches hold them: normalised float32 (unchanged without mean/std),
        on the device batches are delivered to (where `xb` is, unless `deliver_to` named another)."""
        if self.norm is not None: return self.norm.encode(xb, self._deliver)
        return xb if self._deliver is None else xb.to(self._deliver, non_blocking=True)

    def _n_items(self) -> int: return len(self.x) // self.world_size

    def __len__(self) -> int:
        n = self._n_items()
        return n // self.bs if self.drop_last else -(-n // self.bs)

    def _order(self) -> torch.Tensor:
        if self.shuffle: self._epoch_gen = self.gen.get_state()  # to draw this epoch's order again after a stop
        idx = torch.randperm(len(self.x), generator=self.gen) if self.shuffle else torch.arange(len(self.x))
        self.epochs_drawn += 1
        if self.world_size > 1: idx = idx[:self._n_items() * self.world_size][self.rank::self.world_size]
        return idx.to(self.x.device)

    def __iter__(self):
        idx = self._order()  # drawn here, not at the first batch, so `iter()` alone counts as an epoch
        take, dev = (pinned_rows if self.pin_memory else _rows), self._deliver
        def batch(b):
            yb = take(self.y, b)
            return self.normalise(take(self.x, b)), (yb if dev is None else yb.to(dev, non_blocking=True))
        return (batch(b) for b in idx.split(self.bs)[:len(self)])

    def state_dict(self) -> dict:
        """The generator's state and how many epochs were drawn: enough to repeat the coming epochs' order; and its
        state before the latest epoch was drawn (`epoch_gen`), to repeat that epoch's order too."""
        return {'gen': self.gen.get_state(), 'epochs_drawn': self.epochs_drawn, 'seed': self.seed,
                'epoch_gen': self._epoch_gen}

    def load_state_dict(self, sd: dict, repeat_epoch: bool = False) -> None:
        """Restore what `state_dict` returned, so the next epochs come in the same order as they did then; with
        `repeat_epoch`, the next epoch is the one under way when it was taken, in the same order (to go on with an
        epoch that was stopped part-way)."""
        self.seed, self._epoch_gen = sd.get('seed', self.seed), sd.get('epoch_gen')
        if not repeat_epoch:
            self.gen.set_state(sd['gen'])
            self.epochs_drawn = sd['epochs_drawn']
            return
        if self.shuffle:
            if self._epoch_gen is None:
                raise ValueError('TensorDataLoader.load_state_dict: this state holds no epoch under way to repeat')
            self.gen.set_state(self._epoch_gen)
        self.epochs_drawn = max(0, sd['epochs_drawn'] - 1)

    def __repr__(self): return (f'TensorDataLoader({len(self.x)} items, bs={self.bs}, {len(self)} batches, '
                                f'shuffle={self.shuffle}, device={self.x.device})')


def _rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # index_select copies whole rows; `t[idx]` gathers element by element, about twice as slow on a CPU
    return torch.index_select(t, 0, idx)


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None, gen: torch.Generator,
           what: str) -> tuple[torch.Tensor, torch.Tensor]:
    "The first `n` items of a seeded permutation: a random subset with every class present in proportion."
    if n is None or n >= len(x): return x, y
    if n < 1: raise ValueError(f'{what} must be >= 1, got {n}')
    idx = torch.randperm(len(x), generator=gen)[:n]
    return x[idx], y[idx]
