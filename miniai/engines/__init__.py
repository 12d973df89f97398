"""Engines, the ways a fit runs: mixed precision and channels-last (precision), the speed plan (plan), torch.compile
(compile), Hugging Face Accelerate (accelerate), DDP under torchrun (ddp), and what ranks agree on beside the
gradients (cluster). Imports miniai.core, miniai.data, miniai.callbacks and miniai.models only."""
