"""The course's `miniai.diffusion`: the noise schedule, sampling and the U-Net. A front: the code lives in
miniai.models.diffusion and miniai.models.unet."""
from __future__ import annotations

from .models.diffusion import (abar, collate_ddpm, cond_sample, ddim_step, dl_ddpm, inv_abar, noisify,
                               sample)  # noqa: F401
from .models.unet import (DownBlock, EmbResBlock, EmbUNetModel, lin, pre_conv, saved, SelfAttention,
                          SelfAttention2D, timestep_embedding, UpBlock, upsample)  # noqa: F401

__all__ = ['abar', 'inv_abar', 'noisify', 'collate_ddpm', 'dl_ddpm', 'timestep_embedding', 'pre_conv', 'upsample',
           'lin', 'SelfAttention', 'SelfAttention2D', 'EmbResBlock', 'saved', 'DownBlock', 'UpBlock', 'EmbUNetModel',
           'ddim_step', 'sample', 'cond_sample']
