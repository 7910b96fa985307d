"""The papers' recipes, one per data set, as the defaults every flag can override.

LR milestones and the decay length are fractions of training, so a shorter
``--epochs`` keeps the recipe's shape (SVHN: lr / 5 at half of training, as
"epoch 100 of 200"). Where the paper is silent the choice is ours and
marked so.
"""

from __future__ import annotations

PRESETS = {
    # DoReFa-Net's SVHN net and recipe: Adam 1e-3, / 5 at 100 of 200 epochs, batch 128, 40x40;
    # FP branches decay with a cosine over 50 of 200 epochs (the paper's Figure 7).
    "svhn": dict(dataset="svhn", model="svhn_net", width=1.0, optimizer="adam", lr=1e-3, momentum=0.0,
                 weight_decay=0.0, epochs=200, batch_size=128, milestones=(0.5,), lr_factor=0.2,
                 decay="cosine", decay_steps="25%"),
    # VGG-16-BN, SGD lr 0.01 halved at 120, 150, 180 of 300 epochs, batch 128, pad 4 + flip;
    # cosine decay over 50 epochs (Figure 6). Momentum 0.9 and weight decay 5e-4 are our choice.
    "cifar10": dict(dataset="cifar10", model="vgg16_bn", width=1.0, optimizer="sgd", lr=0.01, momentum=0.9,
                    weight_decay=5e-4, epochs=300, batch_size=128, milestones=(0.4, 0.5, 0.6), lr_factor=0.5,
                    decay="cosine", decay_steps=str(50 / 300)),
    "cifar100": dict(dataset="cifar100", model="vgg16_bn", width=1.0, optimizer="sgd", lr=0.01, momentum=0.9,
                     weight_decay=5e-4, epochs=300, batch_size=128, milestones=(0.4, 0.5, 0.6), lr_factor=0.5,
                     decay="cosine", decay_steps=str(50 / 300)),
    # AlexNet-BN: SGD momentum 0.9, lr 0.02 / 10 at 50, 70, 90 of 100 epochs, random crop 224 + flip.
    # Batch 256, weight decay 5e-5 and a decay over 30 epochs are our choice.
    "imagenet": dict(dataset="imagenet", model="alexnet_bn", width=1.0, optimizer="sgd", lr=0.02, momentum=0.9,
                     weight_decay=5e-5, epochs=100, batch_size=256, milestones=(0.5, 0.7, 0.9), lr_factor=0.1,
                     decay="cosine", decay_steps="30%"),
    # Ours, sized for a 2-core CPU: the SVHN net at 0.25x on Fashion-MNIST padded to 40x40,
    # shift +-4 and flip, Adam 1e-3 / 5 at half of training, FP branches gone by 40% of training.
    # 5 epochs: `expcuda compare --preset fmnist` (2 seeds x baseline + EXP-Net) took 6.0 min on
    # the 2-core CPU with other jobs at load ~2 (3 epochs: 3.2 min idle, 8.6 min at load ~4).
    "fmnist": dict(dataset="fmnist", model="svhn_net", width=0.25, optimizer="adam", lr=1e-3, momentum=0.0,
                   weight_decay=0.0, epochs=5, batch_size=128, milestones=(0.5,), lr_factor=0.2,
                   decay="cosine", decay_steps="40%"),
    # Zhuang et al.'s CIFAR-100 setting (their released code): PreResNet-20, W/A 2/2 (or 4/4 by flag),
    # 200 epochs, batch 128, SGD Nesterov momentum 0.9, lr 0.1 for both models, x0.1 at 80 and 120,
    # weight decay 1e-4, a full-precision twin with KL, T = 1, lt 1, ls 0.7, ltl 0.5, lsl 0.7.
    "cifar100-zhuang": dict(dataset="cifar100", model="preresnet20", width=1.0, mode="lp", w_bits=2, a_bits=2,
                            optimizer="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, epochs=200,
                            batch_size=128, milestones=(0.4, 0.6), lr_factor=0.1, distill="kl",
                            decay="cosine", decay_steps="25%"),
    # Their ImageNet ResNet-18 W4/A4 setting: 30 epochs, batch 256, SGD Nesterov, lr 0.005 for the
    # quantized model and 0.001 for the full-precision twin, x0.1 at 15 and 25; weight decay 1e-4 is our
    # choice. They start both models from pretrained full-precision weights: --init-from RUN_DIR.
    "imagenet-zhuang": dict(dataset="imagenet", model="resnet18", width=1.0, mode="lp", w_bits=4, a_bits=4,
                            optimizer="sgd", lr=0.005, twin_lr=0.001, momentum=0.9, nesterov=True,
                            weight_decay=1e-4, epochs=30, batch_size=256, milestones=(0.5, 25 / 30),
                            lr_factor=0.1, distill="kl", decay="cosine", decay_steps="25%"),
}
NAMES = tuple(PRESETS)

#: what ``expcuda compare --preset P`` uses for the flags not given (``methods`` and ``seeds`` included;
#: elsewhere: baseline,exp and 2 seeds). fmnist: the main job, see the README's "Zhuang et al." section.
COMPARE_DEFAULTS = {"fmnist": dict(methods="baseline,exp,distill,exp+distill,two-stage,staircase,sp", seeds=3,
                                   width=0.125, w_bits=2, a_bits=1, epochs=6, limit_train=12000)}
