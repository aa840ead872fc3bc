"""The models, as plain modules, and how ``--arch`` finds one.

``MODELS`` maps a name to a constructor taking ``num_classes`` (the ResNets also
``zero_init_residual``). Anything else comes by import
path, ``package.module:factory`` (a callable taking ``num_classes``), or by torchvision name
when torchvision is installed.
"""

from __future__ import annotations

import importlib

import torch
from torch import nn

from prep.errors import ImgprepError


class AlexNet(nn.Module):
    """Krizhevsky, Sutskever and Hinton (NIPS 2012), 60,965,224 parameters at 1000 classes.

    The two GPU columns are ``groups=2``: conv2, conv4 and conv5 see only the maps of their
    own column; conv3 and the fully connected layers see both. Local response normalisation
    after the ReLUs of conv1 and conv2 follows the paper's
        b = a / (k + alpha * sum over n neighbouring maps of a^2)^beta,  k=2, n=5, alpha=1e-4, beta=0.75;
    PyTorch's LocalResponseNorm divides its alpha by n, so it is given alpha = n * 1e-4.
    Overlapping max-pooling (3, stride 2) after both LRNs and after conv5. Dropout 0.5 on the
    outputs of fc6 and fc7. Input 224 x 224 with padding 2 in conv1 so that its maps are
    55 x 55 as in the paper (its 224 and 55 agree only with that padding); the parameter count
    does not depend on it.

    Initialisation (the paper): weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6 and
    fc7 (to give the ReLUs positive inputs early on), 0 elsewhere.
    """

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        lrn = dict(size=5, alpha=5 * 1e-4, beta=0.75, k=2.0)
        self.conv1 = nn.Conv2d(3, 96, kernel_size=11, stride=4, padding=2)
        self.norm1 = nn.LocalResponseNorm(**lrn)
        self.conv2 = nn.Conv2d(96, 256, kernel_size=5, padding=2, groups=2)
        self.norm2 = nn.LocalResponseNorm(**lrn)
        self.conv3 = nn.Conv2d(256, 384, kernel_size=3, padding=1)
        self.conv4 = nn.Conv2d(384, 384, kernel_size=3, padding=1, groups=2)
        self.conv5 = nn.Conv2d(384, 256, kernel_size=3, padding=1, groups=2)
        self.pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.dropout = nn.Dropout(0.5)
        self.relu = nn.ReLU(inplace=True)
        for layer in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5, self.fc6, self.fc7, self.fc8):
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.zeros_(layer.bias)
        for layer in (self.conv2, self.conv4, self.conv5, self.fc6, self.fc7):
            nn.init.ones_(layer.bias)

    def forward(self, x):  # (B, 3, 224, 224)
        x = self.pool(self.norm1(self.relu(self.conv1(x))))  # conv (B, 96, 55, 55) -> pool (B, 96, 27, 27)
        x = self.pool(self.norm2(self.relu(self.conv2(x))))  # conv (B, 256, 27, 27) -> pool (B, 256, 13, 13)
        x = self.relu(self.conv3(x))  # (B, 384, 13, 13)
        x = self.relu(self.conv4(x))  # (B, 384, 13, 13)
        x = self.pool(self.relu(self.conv5(x)))  # conv (B, 256, 13, 13) -> pool (B, 256, 6, 6)
        x = torch.flatten(x, 1)  # (B, 9216)
        x = self.dropout(self.relu(self.fc6(x)))  # (B, 4096)
        x = self.dropout(self.relu(self.fc7(x)))  # (B, 4096)
        return self.fc8(x)  # (B, num_classes)


class AlexNetOWT(nn.Module):
    """The single-column AlexNet of "One weird trick" (Krizhevsky 2014) as torchvision lays it
    out: the same state_dict keys and shapes as ``torchvision.models.alexnet``, so its published
    weights load. 64/192/384/256/256 maps, no LRN, an adaptive pool to 6 x 6, dropout before
    fc6 and fc7. PyTorch's default initialisation, as torchvision."""

    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),  # 0: (B, 64, 55, 55)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 64, 27, 27)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # 3: (B, 192, 27, 27)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 192, 13, 13)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # 6: (B, 384, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # 8: (B, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # 10: (B, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),  # (B, 256, 6, 6)
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))  # other input sizes still give 6 x 6
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 6 * 6, 4096),  # 1
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),  # 4
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),  # 6
        )

    def forward(self, x):  # (B, 3, 224, 224)
        x = self.avgpool(self.features(x))  # (B, 256, 6, 6)
        return self.classifier(torch.flatten(x, 1))  # (B, num_classes)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and a shortcut: y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)),
    the shortcut a strided 1x1 convolution and norm where the shape changes (ResNet-18, -34)."""

    expansion = 1

    def __init__(self, inputs: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(inputs, width, stride)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride, as torchvision's v1.5 does), 1x1 expand by 4, plus
    the shortcut (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, inputs: int, width: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = shortcut(inputs, width * 4, stride)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (self.downsample(x) if self.downsample is not None else x))


def shortcut(inputs: int, outputs: int, stride: int) -> nn.Sequential | None:
    if stride == 1 and inputs == outputs:
        return None
    return nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))


class ResNet(nn.Module):
    """He et al. 2016, laid out as torchvision's ``ResNet`` (same module names, so the same
    state_dict keys and shapes: its published weights load): a 7x7/2 stem and 3x3/2 max pool,
    four stages of ``blocks`` (widths 64-512, stride 2 from the second), global average pool, fc.
    Convolutions start as He-normal (fan out), norms at weight 1 and bias 0; with
    ``zero_init_residual`` each block's last norm starts at 0, so every block starts as the
    identity (Goyal et al. 2017)."""

    def __init__(self, block, blocks: tuple, num_classes: int = 1000, zero_init_residual: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inputs = 64
        for stage, (width, count) in enumerate(zip((64, 128, 256, 512), blocks)):
            layers = []
            for k in range(count):
                layers.append(block(inputs, width, 2 if stage and k == 0 else 1))
                inputs = width * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inputs, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_norm().weight)

    def forward(self, x):  # (B, 3, H, W), any H, W >= 32
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, zero_init_residual)


def resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, zero_init_residual)


MODELS = {"alexnet": AlexNet, "alexnet-owt": AlexNetOWT, "resnet18": resnet18, "resnet50": resnet50}
RESNETS = ("resnet18", "resnet50")


class UnknownArch(ImgprepError, ValueError):
    """--arch names nothing we can build; the message lists what is valid."""


def torchvision_names() -> list[str]:
    """torchvision's classification models, or [] without a working torchvision."""
    try:
        import torchvision.models
    except Exception:  # absent, or built for another torch (it fails on import then)
        return []
    return sorted(torchvision.models.list_models(module=torchvision.models))


def check_arch(arch: str) -> None:
    """Raise UnknownArch unless ``build_model(arch, ...)`` can find a constructor."""
    if arch in MODELS:
        return
    if ":" in arch:
        module_name, _, factory_name = arch.partition(":")
        if not (module_name.strip() and factory_name.strip()):
            raise UnknownArch(f"--arch {arch!r} names no module or no factory: use package.module:factory")
        try:
            factory = getattr(importlib.import_module(module_name), factory_name)
        except (ImportError, AttributeError, ValueError) as error:
            raise UnknownArch(f"cannot import --arch {arch}: {error}") from None
        if not callable(factory):
            raise UnknownArch(f"--arch {arch} is not callable")
        return
    if arch not in torchvision_names():
        known = ", ".join(list(MODELS) + (["a torchvision model name"] if torchvision_names() else []))
        raise UnknownArch(f"unknown --arch {arch!r}: use {known}, or package.module:factory")


def arch_from_checkpoint(stored: str, given: str | None, path) -> str:
    """The network a checkpoint at ``path`` is rebuilt as. It names its own, but a name that is
    an import path (``package.module:factory``) imports that module and calls the factory: a
    checkpoint, perhaps downloaded, must not choose code to run, so such a name is taken only
    when the user passes the same ``--arch`` (``given``); built-in and torchvision names run
    nothing of the file's choosing and are taken as they are."""
    if given is not None and given != stored:
        raise UnknownArch(f"{path} was trained as --arch {stored}, not {given}")
    if ":" in stored and given is None:
        raise UnknownArch(f"{path} names its network by import path, {stored}: a checkpoint may not choose code "
                          f"to run; pass --arch {stored} to import and run it")
    return stored


def build_model(arch: str, num_classes: int, zero_init_residual: bool = False) -> nn.Module:
    """A fresh model: a name of MODELS, ``package.module:factory``, or a torchvision name."""
    check_arch(arch)
    if zero_init_residual and arch not in RESNETS:
        from train.config import ConfigError

        raise ConfigError(f"--zero-init-residual is for {' and '.join(RESNETS)}, not --arch {arch}")
    if arch in RESNETS:
        return MODELS[arch](num_classes=num_classes, zero_init_residual=zero_init_residual)
    if arch in MODELS:
        return MODELS[arch](num_classes=num_classes)
    if ":" in arch:
        return _from_factory(arch, num_classes)
    import torchvision.models

    return torchvision.models.get_model(arch, num_classes=num_classes)


def _from_factory(arch: str, num_classes: int) -> nn.Module:
    """``factory(num_classes=...)`` of ``package.module:factory``; anything but a model (a
    function of other arguments, a class that takes none, a non-module result) is one line."""
    module_name, _, factory_name = arch.partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    try:
        model = factory(num_classes=num_classes)
    except TypeError as error:  # the wrong signature: os:system, torch.nn:Linear
        raise UnknownArch(f"--arch {arch} is not a model factory: calling it with num_classes={num_classes} "
                          f"failed ({error})") from None
    if not isinstance(model, nn.Module):
        raise UnknownArch(f"--arch {arch} is not a model factory: it returned a {type(model).__name__}, "
                          "not a torch.nn.Module")
    return model


def check_input_size(arch: str, num_classes: int, crop: int) -> None:
    """Refuse a --crop the model cannot take, before any process starts: one forward pass on
    the meta device (shapes only, no memory, no arithmetic)."""
    from train.config import ConfigError

    with torch.device("meta"):
        model = build_model(arch, num_classes)
        try:
            model.eval()(torch.empty(1, 3, crop, crop))
        except (RuntimeError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise ConfigError(f"--arch {arch} cannot take {crop} x {crop} inputs ({reason}); use a larger --crop") from None
