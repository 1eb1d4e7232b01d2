"""Small, readable reference models in plain ``torch.nn`` for pruning experiments and tests."""

from prune_callbacks.reference.models.densenet import DenseNet, densenet, densenet121_like, densenet201_like
from prune_callbacks.reference.models.llama import TinyLlama
from prune_callbacks.reference.models.resnet import DigitsResNet, ResNet, cifar_resnet, resnet50_like
from prune_callbacks.reference.models.vgg import VGG, vgg_cifar
from prune_callbacks.reference.models.vit import TinyViT

__all__ = [
    "VGG",
    "DenseNet",
    "DigitsResNet",
    "ResNet",
    "TinyLlama",
    "TinyViT",
    "cifar_resnet",
    "densenet",
    "densenet121_like",
    "densenet201_like",
    "resnet50_like",
    "vgg_cifar",
]
