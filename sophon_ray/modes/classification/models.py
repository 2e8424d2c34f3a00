"""Model registry. Every model is a :class:`Net`: ``body`` (features, flattened) + ``classifier`` (a
Sequential whose last Linear is the head), so strategies and FTS never special-case architectures."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from sophon_ray.recipes.surgery import last_blocks
from sophon_ray.registry import Registry
from sophon_ray.spec import ModelSpec

MODELS: Registry[Callable[..., "Net"]] = Registry("model")
SMALL_INPUT = 64  # at or below this size, torchvision stems lose their stride/maxpool


class Net(nn.Module):
    """body -> flat features -> classifier; ``head`` is the classifier's last Linear.

    ``blocks`` (modules per block, input to output) is the architecture's block structure, recorded by
    the builder and kept as parameter-name prefixes (see :meth:`blocks`); without it, :func:`default_blocks`
    derives one from a Sequential body at construction.
    """

    def __init__(self, body: nn.Module, classifier: nn.Sequential,
                 blocks: list[list[nn.Module]] | None = None) -> None:
        super().__init__()
        self.body = body
        self.classifier = classifier
        self._blocks = _block_prefixes(self, blocks if blocks is not None else default_blocks(body, classifier))

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

    def blocks(self) -> list[list[str]]:
        """Parameter-name prefixes (ending in '.') of each block, input to output.

        Together they cover every parameter except the head's; ``last-k`` strategies train the last k.
        convnet: each conv block (conv + BN), then the classifier's hidden Linear; ResNets: the stem
        (conv1 + bn1), then the four stages layer1..layer4 (whole stages, not single residual blocks, so k
        stays small and means the same across depths), then hidden classifier layers (none); VGG-13: the
        five conv stages (between pools), then the two hidden Linears.
        """
        return [list(b) for b in self._blocks]

    def block_param_names(self, k: int) -> list[str]:
        """Names of the parameters of the last ``k`` blocks (0 <= k <= number of blocks)."""
        return last_blocks(self, self._blocks, k)


def _block_prefixes(net: Net, blocks: list[list[nn.Module]]) -> list[list[str]]:
    """Module lists -> their names in ``net`` + '.', checked to cover every non-head parameter exactly once."""
    names = {id(m): name for name, m in net.named_modules()}
    missing = [m for block in blocks for m in block if id(m) not in names]
    if missing:
        raise ValueError(f"Net blocks name {len(missing)} module(s) that are not part of the model")
    prefixes = [[names[id(m)] + "." for m in block] for block in blocks]
    flat = tuple(p for block in prefixes for p in block)
    head = f"classifier.{len(net.classifier) - 1}."
    owners = {n: [p for p in flat if n.startswith(p)] for n, _ in net.named_parameters() if not n.startswith(head)}
    bad = {n: o for n, o in owners.items() if len(o) != 1}
    if bad:
        raise ValueError(f"Net blocks must cover every non-head parameter exactly once; wrong for "
                         f"{sorted(bad)[:5]}")
    return prefixes


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def default_blocks(body: nn.Module, classifier: nn.Sequential) -> list[list[nn.Module]]:
    """A generic block structure for a hand-built Net: in a Sequential body, a block starts at each child
    holding a weight matrix/kernel (conv, linear) and takes the following parameterised children without
    one (BatchNorm); then each hidden Linear of the classifier. A non-Sequential body is one block."""
    blocks: list[list[nn.Module]] = []
    children = list(body) if isinstance(body, nn.Sequential) else [body]
    for child in children:
        if not _has_params(child):
            continue
        if any(p.dim() >= 2 for p in child.parameters()) or not blocks:
            blocks.append([child])
        else:
            blocks[-1].append(child)
    blocks += [[m] for m in list(classifier)[:-1] if _has_params(m)]
    return blocks


def build(spec: ModelSpec, channels: int = 3, image_size: int = 32, weights: str | None = None) -> Net:
    """Build the classifier ``spec.arch`` (:data:`MODELS`) for ``channels`` x ``image_size`` inputs with
    ``spec.num_classes`` outputs; ``weights='torchvision'`` loads its published ImageNet weights into the body
    (needs a download). Callers use :func:`sophon_ray.modes.build_model` (which also applies channels-last)."""
    return MODELS.get(spec.arch)(num_classes=spec.num_classes, channels=channels, image_size=image_size,
                                 weights=weights)


def _conv_block(c_in: int, c_out: int, bn: bool) -> list[nn.Module]:
    """conv (+ BN): the parameterised part of one convnet block (ReLU and pooling follow)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=not bn)]
    return layers + ([nn.BatchNorm2d(c_out)] if bn else [])


def _convnet(num_classes: int, channels: int, bn: bool, width: int = 16) -> Net:
    """Three conv blocks + a hidden Linear: 4 blocks for ``last-k``."""
    convs = [_conv_block(channels, width, bn), _conv_block(width, 2 * width, bn),
             _conv_block(2 * width, 4 * width, bn)]
    pools = [nn.MaxPool2d(2), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1)]
    body = nn.Sequential(*[m for conv, pool in zip(convs, pools) for m in [*conv, nn.ReLU(inplace=True), pool]],
                         nn.Flatten())
    hidden = nn.Linear(4 * width, 4 * width)
    classifier = nn.Sequential(hidden, nn.ReLU(inplace=True), nn.Linear(4 * width, num_classes))
    return Net(body, classifier, blocks=[*convs, [hidden]])


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
    blocks = [[net.conv1, net.bn1], [net.layer1], [net.layer2], [net.layer3], [net.layer4]]
    return Net(body, nn.Sequential(nn.Linear(net.fc.in_features, num_classes)), blocks=blocks)


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
    stages: list[list[nn.Module]] = [[]]  # the conv stages, split at torchvision's pools (before trimming)
    for m in layers:
        if isinstance(m, nn.MaxPool2d):
            stages.append([])
        elif isinstance(m, nn.Conv2d):
            stages[-1].append(m)
    pools_allowed = max(0, int(math.log2(image_size)))
    pool_idx = [i for i, m in enumerate(layers) if isinstance(m, nn.MaxPool2d)]
    for i in pool_idx[pools_allowed:]:
        layers[i] = nn.Identity()
    body = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    hidden = [nn.Linear(512, 512), nn.Linear(512, 512)]
    classifier = nn.Sequential(hidden[0], nn.ReLU(inplace=True), nn.Dropout(0.5),
                               hidden[1], nn.ReLU(inplace=True), nn.Dropout(0.5),
                               nn.Linear(512, num_classes))
    return Net(body, classifier, blocks=[s for s in stages if s] + [[h] for h in hidden])
