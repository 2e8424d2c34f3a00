"""The standard FID network: the 2015-12-05 TensorFlow Inception-v3 graph (Heusel et al.'s TTUR code) as
pytorch-fid and torch-fidelity port it to PyTorch, so a FID computed here is the number those tools compute.

It is torchvision's :class:`~torchvision.models.Inception3` layout (the same module names, so its state dict loads
as is) with a 1008-way classifier, no auxiliary head, and the blocks of the TensorFlow graph where they differ from
torchvision's ImageNet network:

* ``FIDInceptionA`` (Mixed_5b-d), ``FIDInceptionC`` (Mixed_6b-e), ``FIDInceptionE_1`` (Mixed_7b): the pooling
  branch averages over the real pixels only (TensorFlow's average pool leaves the zero padding out:
  ``count_include_pad=False``);
* ``FIDInceptionE_2`` (Mixed_7c): the pooling branch max-pools (the TensorFlow graph's choice, not the paper's).

Features: the 2048-d global average pool after Mixed_7c, of images resized to 299 x 299 (bilinear,
``align_corners=False``) and scaled from [0, 1] to [-1, 1], in eval mode: what pytorch-fid's ``InceptionV3`` with
its default block (2048) returns. The weights are a local file (pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth``;
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` is the same file); nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.inception import Inception3, InceptionA, InceptionC, InceptionE

from sophon_ray.errors import SophonError

FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"  # pytorch-fid's release asset (torch-fidelity: same bytes)
FID_CLASSES = 1008       # the TensorFlow graph's classifier (1000 ImageNet classes + 8 unused)
FID_SIZE = 299
FID_DIMS = 2048
TORCHVISION_IMAGENET_FILE = "inception_v3_google-0cc3c7bd.pth"  # not the FID network (sample_frechet_imagenet's)


class InceptionWeightsError(SophonError, ValueError):
    """A weights file that is missing or is not the network it was given as; the message names the file and the fix."""


def _avg_pool(x: Tensor) -> Tensor:
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(InceptionA):
    """InceptionA whose pooling branch leaves the padding out of its average (as TensorFlow's)."""

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b1, b5, b3, self.branch_pool(_avg_pool(x))], 1)


class FIDInceptionC(InceptionC):
    """InceptionC whose pooling branch leaves the padding out of its average."""

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            b7d = layer(b7d)
        return torch.cat([b1, b7, b7d, self.branch_pool(_avg_pool(x))], 1)


class _FIDInceptionE(InceptionE):
    """InceptionE with the pooling of its pooling branch chosen by the subclass."""

    def pool(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        return torch.cat([b1, b3, b3d, self.branch_pool(self.pool(x))], 1)


class FIDInceptionE_1(_FIDInceptionE):  # noqa: N801 - pytorch-fid's name for the block
    """Mixed_7b: the pooling branch averages without the padding."""

    def pool(self, x: Tensor) -> Tensor:
        return _avg_pool(x)


class FIDInceptionE_2(_FIDInceptionE):  # noqa: N801
    """Mixed_7c: the pooling branch max-pools (as the TensorFlow graph does)."""

    def pool(self, x: Tensor) -> Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


def fid_inception_v3() -> Inception3:
    """The FID Inception network's modules, untrained (load a state dict into it: :func:`load_fid_inception`)."""
    net = Inception3(num_classes=FID_CLASSES, aux_logits=False, transform_input=False, init_weights=False)
    net.Mixed_5b = FIDInceptionA(192, pool_features=32)
    net.Mixed_5c = FIDInceptionA(256, pool_features=64)
    net.Mixed_5d = FIDInceptionA(288, pool_features=64)
    net.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
    net.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
    net.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
    net.Mixed_7b = FIDInceptionE_1(1280)
    net.Mixed_7c = FIDInceptionE_2(2048)
    return net


class FIDInception(nn.Module):
    """The standard FID feature extractor: ``[N, 3, H, W]`` images in [0, 1] -> ``[N, 2048]`` pool features."""

    def __init__(self, net: Inception3) -> None:
        super().__init__()
        self.net = net.eval()

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        n = self.net
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        for layer in (n.Conv2d_1a_3x3, n.Conv2d_2a_3x3, n.Conv2d_2b_3x3, n.maxpool1, n.Conv2d_3b_1x1,
                      n.Conv2d_4a_3x3, n.maxpool2, n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b,
                      n.Mixed_6c, n.Mixed_6d, n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = layer(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def _fix(path: Path) -> str:
    return (f"Fix: set generation.fid_inception to a local copy of pytorch-fid's {FID_INCEPTION_FILE} (its GitHub "
            "release 'fid_weights'; torch-fidelity's weights-inception-2015-12-05-6726825d.pth is the same file), "
            f"downloaded once on a machine with a network and copied here (got {path}); nothing is downloaded at run "
            "time")


def _read(path: Path, mmap: bool = False) -> dict[str, Tensor]:
    """The state dict at ``path`` (memory-mapped when ``mmap`` and the file's format allows it)."""
    if not path.is_file():
        raise InceptionWeightsError(f"fid_inception: no file at {path}. {_fix(path)}")
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError:
            if not mmap:
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)   # a file of the legacy format
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise InceptionWeightsError(f"fid_inception: {path} is not a readable PyTorch state dict "
                                    f"({type(err).__name__}: {str(err)[:200]}). {_fix(path)}") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InceptionWeightsError(f"fid_inception: {path} holds a {type(state).__name__}, not a state dict of "
                                    f"tensors. {_fix(path)}")
    return state


def _check(path: Path, state: dict[str, Tensor]) -> None:
    """InceptionWeightsError unless ``state`` has exactly the FID network's keys and shapes (num_batches_tracked,
    which eval mode does not use, may be there or not)."""
    with torch.device("meta"):
        want = {k: v.shape for k, v in fid_inception_v3().state_dict().items() if not k.endswith("num_batches_tracked")}
    have = {k: v.shape for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
    shapes = sorted(k for k in want.keys() & have.keys() if want[k] != have[k])
    if not (missing or unexpected or shapes):
        return
    found = "; ".join(part for part in (
        f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3])})" if missing else "",
        f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3])})" if unexpected else "",
        "other shapes: " + ", ".join(f"{k} {list(have[k])} (want {list(want[k])})" for k in shapes[:3])
        if shapes else "") if part)
    imagenet = any(k.startswith("AuxLogits.") for k in have) or have.get("fc.weight") == torch.Size([1000, 2048])
    hint = (f" It looks like torchvision's ImageNet Inception-v3 ({TORCHVISION_IMAGENET_FILE}), which is not the FID "
            "network: give it as generation.imagenet_inception (sample_frechet_imagenet) instead." if imagenet else "")
    raise InceptionWeightsError(f"fid_inception: {path} is not the FID Inception network's state dict ({found})."
                                f"{hint} {_fix(path)}")


def weights_problem(path: str | Path) -> str | None:
    """What is wrong with ``path`` as the FID network's weights (the message :func:`load_fid_inception` would raise),
    or None; cheap (the file is memory-mapped where its format allows), for spec validation."""
    path = Path(path).expanduser()
    try:
        _check(path, _read(path, mmap=True))
    except InceptionWeightsError as err:
        return str(err)
    return None


def load_fid_inception(path: str | Path, device: torch.device | str = "cpu") -> FIDInception:
    """:class:`FIDInception` with the state dict at ``path``, in eval mode on ``device``.

    :class:`InceptionWeightsError` (naming the file and the fix) when there is no file, when it is not a state dict,
    or when its keys or shapes are not the FID network's (torchvision's ImageNet Inception-v3 is recognised and
    pointed to ``generation.imagenet_inception``)."""
    path = Path(path).expanduser()
    state = _read(path)
    _check(path, state)
    net = fid_inception_v3()
    net.load_state_dict(state, strict=False)   # every key checked above; num_batches_tracked is unused in eval
    return FIDInception(net).to(device)
