"""Models: layers and initialisation (layers), ResNets (resnet), the diffusion U-Net (unet) and diffusion's schedule
and sampling (diffusion). Imports miniai.core, miniai.data and miniai.callbacks only."""
