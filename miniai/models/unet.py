"""The diffusion U-Net of the course's later lessons: a noise predictor conditioned on the time step.

`EmbUNetModel` embeds the time step `t` (sinusoids through an MLP), runs the image down through `DownBlock`s, a
middle `EmbResBlock` and back up through `UpBlock`s that take the down path's activations as skip connections.
Every `EmbResBlock` sees the embedding as a per-channel scale and shift, and may end with self-attention over the
pixels (`SelfAttention2D`, through `F.scaled_dot_product_attention`: fused kernels where the device has them).
The names, parameters and submodule names are the course's (`miniai.diffusion` exports them), so its code runs here
and its state dicts load.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .layers import Act, Norm

__all__ = ['timestep_embedding', 'pre_conv', 'upsample', 'lin', 'SelfAttention', 'SelfAttention2D', 'EmbResBlock',
           'saved', 'DownBlock', 'UpBlock', 'EmbUNetModel']


def timestep_embedding(tsteps: torch.Tensor, emb_dim: int, max_period: float = 10000) -> torch.Tensor:
    """Sinusoidal embedding [N, emb_dim] of the time steps `tsteps` [N]: the sines, then the cosines, of `tsteps`
    times `emb_dim // 2` frequencies spaced geometrically from 1 down to `1 / max_period` (a zero column appended
    when `emb_dim` is odd)."""
    freqs = torch.exp(-math.log(max_period) * torch.linspace(0, 1, emb_dim // 2, device=tsteps.device))
    angles = tsteps.float()[:, None] * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(emb, (0, emb_dim % 2))


def _pre_act(layer: nn.Module, ni: int, act, norm) -> nn.Sequential:
    "`layer` preceded by `norm(ni)` and `act()` where given: the pre-activation order."
    return nn.Sequential(*([norm(ni)] if norm else []), *([act()] if act else []), layer)


def pre_conv(ni: int, nf: int, ks: int = 3, stride: int = 1, act: Act = nn.SiLU, norm: Norm = None,
             bias: bool = True) -> nn.Sequential:
    "A pre-activation convolution: `norm` (if any), `act` (if any), then a `ks`x`ks` conv with 'same' padding."
    return _pre_act(nn.Conv2d(ni, nf, ks, stride=stride, padding=ks // 2, bias=bias), ni, act, norm)


def upsample(nf: int) -> nn.Sequential:
    "Double the height and width (nearest neighbour), then a 3x3 conv of `nf` channels."
    return nn.Sequential(nn.Upsample(scale_factor=2.), nn.Conv2d(nf, nf, 3, padding=1))


def lin(ni: int, nf: int, act: Act = nn.SiLU, norm: Norm = None, bias: bool = True) -> nn.Sequential:
    "A pre-activation linear layer: `norm` (if any), `act` (if any), then `nn.Linear(ni, nf)`."
    return _pre_act(nn.Linear(ni, nf, bias=bias), ni, act, norm)


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sequence [N, C, S] (`transpose`, channels first) or [N, S, C], with heads of
    `attn_chans` channels each: layer norm, one projection to queries, keys and values, softmax(QKᵀ/√d)V per head
    (`F.scaled_dot_product_attention`), an output projection. Returns that alone (no residual), in the input's
    layout."""
    def __init__(self, ni: int, attn_chans: int, transpose: bool = True) -> None:
        super().__init__()
        if attn_chans < 1 or ni % attn_chans:
            raise ValueError(f'SelfAttention: {ni} channels do not split into heads of attn_chans={attn_chans}')
        self.nheads, self.head_dim, self.t = ni // attn_chans, attn_chans, transpose
        self.scale = math.sqrt(attn_chans)
        self.norm = nn.LayerNorm(ni)
        self.qkv = nn.Linear(ni, ni * 3)
        self.proj = nn.Linear(ni, ni)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.t: x = x.transpose(1, 2)
        n, s, c = x.shape
        # each head's queries, keys and values lie side by side in qkv's output (the course's layout, so its
        # weights mean the same here): [N, S, heads, 3 * head_dim]
        qkv = self.qkv(self.norm(x)).view(n, s, self.nheads, 3 * self.head_dim).transpose(1, 2)
        q, k, v = qkv.chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)  # [N, heads, S, head_dim]
        out = self.proj(out.transpose(1, 2).reshape(n, s, c))
        return out.transpose(1, 2) if self.t else out


class SelfAttention2D(SelfAttention):
    "`SelfAttention` over the pixels of a feature map [N, C, H, W]."
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return super().forward(x.reshape(n, c, h * w)).reshape(n, c, h, w)


class EmbResBlock(nn.Module):
    """Two pre-activation convs with the embedding, projected to a per-channel scale and shift, applied between
    them; a shortcut (a 1x1 conv when the widths differ); then, if `attn_chans`, self-attention added on."""
    def __init__(self, n_emb: int, ni: int, nf: int | None = None, ks: int = 3, act: Act = nn.SiLU,
                 norm: Norm = nn.BatchNorm2d, attn_chans: int = 0) -> None:
        super().__init__()
        nf = ni if nf is None else nf
        self.emb_proj = nn.Linear(n_emb, nf * 2)
        self.conv1 = pre_conv(ni, nf, ks, act=act, norm=norm)
        self.conv2 = pre_conv(nf, nf, ks, act=act, norm=norm)
        self.idconv = nn.Identity() if ni == nf else nn.Conv2d(ni, nf, 1)
        self.attn = SelfAttention2D(nf, attn_chans) if attn_chans else None

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        scale, shift = self.emb_proj(F.silu(t))[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(self.conv1(x) * (1 + scale) + shift) + self.idconv(x)
        return h + self.attn(h) if self.attn is not None else h


class _SaveOutput:
    """A forward hook appending the module's output to `blk.saved`. An object rather than a closure: a deep copy
    of the model (an EMA of it, say) copies it too, and the copy then saves into the copied block."""
    def __init__(self, blk: nn.Module): self.blk = blk
    def __call__(self, module, args, output): self.blk.__dict__.setdefault('saved', []).append(output)


def saved(m: nn.Module, blk: nn.Module) -> nn.Module:
    "Make `m`'s forward also append its output to `blk.saved` (a forward hook); returns `m`."
    m.register_forward_hook(_SaveOutput(blk))
    return m


class DownBlock(nn.Module):
    """`num_layers` `EmbResBlock`s, then (if `add_down`) a stride-2 3x3 conv; each of their outputs is kept in
    `.saved` for the up path's skip connections."""
    def __init__(self, n_emb: int, ni: int, nf: int, add_down: bool = True, num_layers: int = 1, attn_chans: int = 0) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([saved(EmbResBlock(n_emb, ni if i == 0 else nf, nf, attn_chans=attn_chans), self)
                                      for i in range(num_layers)])
        self.down = saved(nn.Conv2d(nf, nf, 3, stride=2, padding=1), self) if add_down else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.saved = []
        for res in self.resnets: x = res(x, t)
        return self.down(x)


class UpBlock(nn.Module):
    """`num_layers` `EmbResBlock`s, each taking the previous output concatenated with the last of `ups` (popped),
    then (if `add_up`) `upsample`. `prev_nf` is the width coming in, `ni` that of the last skip it takes."""
    def __init__(self, n_emb: int, ni: int, prev_nf: int, nf: int, add_up: bool = True, num_layers: int = 2,
                 attn_chans: int = 0) -> None:
        super().__init__()
        width_in = lambda i: (prev_nf if i == 0 else nf) + (ni if i == num_layers - 1 else nf)
        self.resnets = nn.ModuleList([EmbResBlock(n_emb, width_in(i), nf, attn_chans=attn_chans)
                                      for i in range(num_layers)])
        self.up = upsample(nf) if add_up else nn.Identity()

    def forward(self, x: torch.Tensor, t: torch.Tensor, ups: list) -> torch.Tensor:
        for res in self.resnets: x = res(torch.cat([x, ups.pop()], dim=1), t)
        return self.up(x)


class EmbUNetModel(nn.Module):
    """A U-Net predicting the noise in `x` at time `t`: one level per entry of `nfs` (halving the size between
    levels), `num_layers` res blocks a level going down and one more coming up, attention (heads of `attn_chans`
    channels) from level `attn_start` on. `forward((x, t))`, as a Learner passes a batch's input, or `forward(x, t)`;
    `x` [N, in_channels, H, W] with H and W divisible by 2 ** (len(nfs) - 1), `t` [N] (or [1]) in [0, 1)."""
    def __init__(self, in_channels: int = 3, out_channels: int = 3, nfs: Sequence[int] = (224, 448, 672, 896),
                 num_layers: int = 1, attn_chans: int = 8, attn_start: int = 1) -> None:
        super().__init__()
        n = len(nfs)
        self.conv_in = nn.Conv2d(in_channels, nfs[0], kernel_size=3, padding=1)
        self.n_temb = nfs[0]
        n_emb = self.n_temb * 4
        self.emb_mlp = nn.Sequential(lin(self.n_temb, n_emb, norm=nn.BatchNorm1d), lin(n_emb, n_emb))
        widths_in = [nfs[0], *nfs[:-1]]
        self.downs = nn.ModuleList([DownBlock(n_emb, widths_in[i], nfs[i], add_down=i != n - 1, num_layers=num_layers,
                                              attn_chans=attn_chans if i >= attn_start else 0) for i in range(n)])
        self.mid_block = EmbResBlock(n_emb, nfs[-1])
        rev = list(reversed(nfs))
        self.ups = nn.ModuleList([UpBlock(n_emb, rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i],
                                          add_up=i != n - 1, num_layers=num_layers + 1,
                                          attn_chans=attn_chans if i < n - attn_start else 0) for i in range(n)])
        self.conv_out = pre_conv(nfs[0], out_channels, act=nn.SiLU, norm=nn.BatchNorm2d, bias=False)

    def forward(self, inp: Any, t: torch.Tensor | None = None) -> torch.Tensor:
        x, t = inp if t is None else (inp, t)
        step = 2 ** (len(self.downs) - 1)
        if x.dim() != 4 or x.shape[-2] % step or x.shape[-1] % step:
            raise ValueError(f'EmbUNetModel: with {len(self.downs)} levels the images must be [N, C, H, W] with H and '
                             f'W divisible by {step}; got {tuple(x.shape)} (pad them, e.g. 28x28 to 32x32)')
        emb = self.emb_mlp(timestep_embedding(t.reshape(-1), self.n_temb).to(x.dtype))
        x = self.conv_in(x)
        skips = [x]
        for block in self.downs:
            x = block(x, emb)
            skips += block.saved  # pyright: ignore[reportOperatorIssue]  (a down block keeps a list)
            block.saved = []  # the skips are ours now: the blocks need not hold on to them after this call  # pyright: ignore[reportArgumentType]
        x = self.mid_block(x, emb)
        for block in self.ups: x = block(x, emb, skips)
        return self.conv_out(x)
