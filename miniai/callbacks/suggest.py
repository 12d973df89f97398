"""What `lr_find` suggests from a loss-against-learning-rate curve: `minimum`, `steep` and `valley`."""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ['SuggestedLRs', 'smooth_losses', 'lr_suggestions']


class SuggestedLRs(float):
    """The learning rates `lr_find` suggests. As a number it is `minimum` (what `lr_find` always returned); also
    `valley` (inside the long descent before the minimum, the usual choice for fine-tuning) and `steep` (where the loss
    falls fastest)."""
    minimum: float
    steep: float
    valley: float

    def __new__(cls, minimum: float, steep: float, valley: float):
        self = super().__new__(cls, minimum)
        self.minimum, self.steep, self.valley = minimum, steep, valley
        return self

    def as_dict(self) -> dict: return {'valley': self.valley, 'minimum': self.minimum, 'steep': self.steep}
    def __repr__(self): return 'SuggestedLRs(' + ', '.join(f'{k}={v:.2e}' for k, v in self.as_dict().items()) + ')'


def smooth_losses(losses: Sequence[float], beta: float = 0.98) -> list[float]:
    "The bias-corrected exponential moving average of `losses`, up to the first one that is not finite."
    avg, out = 0., []
    for i, loss in enumerate(losses):
        if not math.isfinite(loss): break
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def lr_suggestions(lrs: Sequence[float], losses: Sequence[float], beta: float = 0.98) -> SuggestedLRs:
    """`minimum`: a tenth of the rate at the smoothed loss's lowest point; `steep`: the rate where it falls fastest
    against log(rate); `valley`: the geometric middle of the longest stretch over which it keeps falling (by more than
    noise) and that ends at or before the lowest point."""
    if not lrs: raise ValueError('lr_find: no learning rate was recorded')
    s = smooth_losses(losses, beta)
    if not s: return SuggestedLRs(lrs[0] / 10, lrs[0], lrs[0])
    lo = min(range(len(s)), key=s.__getitem__)
    slopes = [(s[i + 1] - s[i]) / max(1e-12, math.log(lrs[i + 1] / lrs[i])) for i in range(len(s) - 1)]
    steep = lrs[min(range(len(slopes)), key=slopes.__getitem__)] if slopes else lrs[0]
    # the longest run of falling loss up to the minimum, allowing small rises (a tenth of the curve's range)
    tol = 0.1 * (max(s[:lo + 1]) - s[lo]) if lo else 0.
    best, start = (0, 0), 0
    for i in range(1, lo + 1):
        if s[i] > s[i - 1] + tol: start = i
        elif i - start > best[1] - best[0]: best = (start, i)
    a, b = best
    valley = math.sqrt(lrs[a] * lrs[b])
    return SuggestedLRs(lrs[lo] / 10, steep, valley)
