"""The paper's models built from expanded blocks, all from one ModelConfig.

``build(cfg)`` or the named constructors: ``svhn_net(width)``,
``vgg16_bn(width, num_classes)``, ``alexnet_bn(num_classes)``,
``preresnet20(width, num_classes)``, ``resnet18(num_classes)``; keyword
options go into the config (mode, expand_layers, quantizers, bits, scheme...).
"""

from __future__ import annotations

from torch import nn

from expcuda.models.config import INPUT_SIZE, MODES, ModelConfig

ARCHS = tuple(INPUT_SIZE)


def build(cfg: ModelConfig) -> nn.Module:
    """The model ``cfg`` describes, freshly initialised."""
    from expcuda.models.alexnet import AlexNetBN
    from expcuda.models.resnet import PreResNet20, ResNet18
    from expcuda.models.svhn import SVHNNet
    from expcuda.models.vgg import VGG16BN

    classes = {"svhn_net": SVHNNet, "vgg16_bn": VGG16BN, "alexnet_bn": AlexNetBN,
               "preresnet20": PreResNet20, "resnet18": ResNet18}
    model = classes[cfg.arch](cfg)
    model.config = cfg  # kept on the model so export can write lp_model.json
    return model


def svhn_net(width: float = 1.0, num_classes: int = 10, **options) -> nn.Module:
    return build(ModelConfig(arch="svhn_net", width=width, num_classes=num_classes, **options))


def vgg16_bn(width: float = 1.0, num_classes: int = 10, **options) -> nn.Module:
    return build(ModelConfig(arch="vgg16_bn", width=width, num_classes=num_classes, **options))


def alexnet_bn(num_classes: int = 1000, **options) -> nn.Module:
    return build(ModelConfig(arch="alexnet_bn", num_classes=num_classes, **options))


def preresnet20(width: float = 1.0, num_classes: int = 100, **options) -> nn.Module:
    return build(ModelConfig(arch="preresnet20", width=width, num_classes=num_classes, **options))


def resnet18(num_classes: int = 1000, **options) -> nn.Module:
    return build(ModelConfig(arch="resnet18", num_classes=num_classes, **options))


__all__ = ["ModelConfig", "MODES", "ARCHS", "build", "svhn_net", "vgg16_bn", "alexnet_bn",
           "preresnet20", "resnet18"]
