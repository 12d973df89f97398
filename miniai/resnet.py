"""The course's `miniai.resnet`: `ResBlock`, `GlobalAvgPool` and ResNets. A front: the code lives in
miniai.models.resnet."""
from __future__ import annotations

from .models.resnet import (act_gr, BasicBlock, Bottleneck, fashion_resnet, fashion_resnet9,
                            GlobalAvgPool, ResBlock, ResNet, resnet18, resnet34, resnet50, resnet9,
                            seed002_resnet)  # noqa: F401

__all__ = ['act_gr', 'ResBlock', 'GlobalAvgPool', 'fashion_resnet', 'seed002_resnet', 'resnet9', 'fashion_resnet9',
           'BasicBlock', 'Bottleneck', 'ResNet', 'resnet18', 'resnet34', 'resnet50']
