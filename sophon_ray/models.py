"""Model registry. Every model is a :class:`Net`: ``body`` (features, flattened) + ``classifier`` (a
Sequential whose last Linear is the head), so strategies and FTS never special-case architectures."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sophon_ray.registry import Registry
from sophon_ray.spec import ModelSpec

MODELS: Registry[Callable[..., "Net"]] = Registry("model")
SMALL_INPUT = 64  # at or below this size, torchvision stems lose their stride/maxpool


class Net(nn.Module):
    """body -> flat features -> classifier; ``head`` is the classifier's last Linear."""

    def __init__(self, body: nn.Module, classifier: nn.Sequential) -> None:
        super().__init__()
        self.body = body
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    @property
    def head(self) -> nn.Linear:
        return self.classifier[-1]

    def head_param_names(self) -> list[str]:
        prefix = f"classifier.{len(self.classifier) - 1}."
        return [n for n, _ in self.named_parameters() if n.startswith(prefix)]

    def classifier_param_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith("classifier.")]


def build_model(spec: ModelSpec, channels: int = 3, image_size: int = 32, weights: str | None = None) -> Net:
    """Build ``spec.arch`` for ``channels`` x ``image_size`` inputs with ``spec.num_classes`` outputs.

    ``weights='torchvision'`` loads the architecture's published ImageNet weights into the body (needs a
    download); raises KeyError for an unknown architecture. With ``spec.channels_last`` the model's 4-D
    weights are NHWC, and convolutions then run channels-last whatever the input's layout.
    """
    model = MODELS.get(spec.arch)(num_classes=spec.num_classes, channels=channels, image_size=image_size,
                                  weights=weights)
    return model.to(memory_format=torch.channels_last) if spec.channels_last else model


def _conv_block(c_in: int, c_out: int, bn: bool, pool: nn.Module) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)]
    if bn:
        layers.append(nn.BatchNorm2d(c_out))
    return layers + [nn.ReLU(inplace=True), pool]


def _convnet(num_classes: int, channels: int, bn: bool, width: int = 16) -> Net:
    body = nn.Sequential(
        *_conv_block(channels, width, bn, nn.MaxPool2d(2)),
        *_conv_block(width, 2 * width, bn, nn.MaxPool2d(2)),
        *_conv_block(2 * width, 4 * width, bn, nn.AdaptiveAvgPool2d(1)),
        nn.Flatten(),
    )
    classifier = nn.Sequential(nn.Linear(4 * width, 4 * width), nn.ReLU(inplace=True),
                               nn.Linear(4 * width, num_classes))
    return Net(body, classifier)


def _no_pretrained(arch: str, weights: str | None) -> None:
    if weights:
        raise ValueError(f"model '{arch}' has no published weights; remove pretrain.weights or pick a "
                         "torchvision architecture (resnet18, resnet34, resnet50, vgg13)")


@MODELS.register("convnet")
def convnet(num_classes: int, channels: int, image_size: int, weights: str | None = None) -> Net:
    """Tiny 3-block CNN with BatchNorm (~28k parameters at 10 classes); any input size."""
    _no_pretrained("convnet", weights)
    return _convnet(num_classes, channels, bn=True)


@MODELS.register("convnet_nobn")
def convnet_nobn(num_classes: int, channels: int, image_size: int, weights: str | None = None) -> Net:
    """The same tiny CNN without BatchNorm."""
    _no_pretrained("convnet_nobn", weights)
    return _convnet(num_classes, channels, bn=False)


def _torchvision_state(arch: str) -> dict[str, torch.Tensor]:
    import torchvision  # noqa: PLC0415

    try:
        published = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
        return published.get_state_dict(progress=False)
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise RuntimeError(f"could not load torchvision's ImageNet weights for {arch} ({err}); they download "
                           "from download.pytorch.org: run where that is reachable, or pretrain instead "
                           "(pretrain.weights: null)") from err


def _resnet(arch: str, num_classes: int, channels: int, image_size: int, weights: str | None) -> Net:
    import torchvision  # noqa: PLC0415

    net = getattr(torchvision.models, arch)(weights=None)
    if weights == "torchvision":
        net.load_state_dict(_torchvision_state(arch))
    if channels != 3:
        net.conv1 = nn.Conv2d(channels, 64, 7, stride=2, padding=3, bias=False)
    if image_size <= SMALL_INPUT:  # keep resolution for 16-64 px inputs (the 7x7 kernel and weights stay)
        net.conv1.stride = (1, 1)
        net.maxpool = nn.Identity()
    body = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3,
                         net.layer4, net.avgpool, nn.Flatten())
    return Net(body, nn.Sequential(nn.Linear(net.fc.in_features, num_classes)))


@MODELS.register("resnet18")
def resnet18(num_classes: int, channels: int, image_size: int, weights: str | None = None) -> Net:
    """torchvision ResNet-18; stem stride 1 and no maxpool at <= 64 px."""
    return _resnet("resnet18", num_classes, channels, image_size, weights)


@MODELS.register("resnet34")
def resnet34(num_classes: int, channels: int, image_size: int, weights: str | None = None) -> Net:
    """torchvision ResNet-34; stem stride 1 and no maxpool at <= 64 px."""
    return _resnet("resnet34", num_classes, channels, image_size, weights)


@MODELS.register("resnet50")
def resnet50(num_classes: int, channels: int, image_size: int, weights: str | None = None) -> Net:
    """torchvision ResNet-50; stem stride 1 and no maxpool at <= 64 px."""
    return _resnet("resnet50", num_classes, channels, image_size, weights)


@MODELS.register("vgg13")
def vgg13(num_classes: int, channels: int, image_size: int, weights: str | None = None) -> Net:
    """torchvision VGG-13 features (pools trimmed so small inputs keep >= 1 px) + global pool + 3-layer MLP."""
    import torchvision  # noqa: PLC0415

    net = torchvision.models.vgg13(weights=None)
    if weights == "torchvision":
        net.load_state_dict(_torchvision_state("vgg13"))
    layers = list(net.features)
    if channels != 3:
        layers[0] = nn.Conv2d(channels, 64, 3, padding=1)
    pools_allowed = max(0, int(math.log2(image_size)))
    pool_idx = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    for i in pool_idx[pools_allowed:]:
        layers[i] = nn.Identity()
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    classifier = nn.Sequential(nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                               nn.Linear(512, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                               nn.Linear(512, num_classes))
    return Net(body, classifier)
