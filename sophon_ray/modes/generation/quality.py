"""Sample-quality scores for generation mode: how good are the images an (attacked) diffusion model makes?

Two offline scores need nothing but the restricted domain's own labelled data:

* **KID** (Kernel Inception Distance, Binkowski et al. 2018) between real and generated images, measured in
  the penultimate-layer features of a small classifier trained here on the restricted domain's training split
  (:func:`train_feature_net`) instead of Inception, so it runs offline on any domain and image size.
* **Recognisability**: how confidently that classifier recognises the generated images, and whether they
  cover all its classes (:func:`recognisability`).

:func:`sample_quality` makes both in one call. Two Frechet distances need Inception weights as local files
(nothing is ever downloaded), :func:`inception_scores` makes whichever has its file:

* **FID** (Heusel et al. 2017), :func:`fid`: in the standard FID network's pool features, the 2015 TensorFlow
  Inception that pytorch-fid and torch-fidelity use (:mod:`.fid_inception`); the number papers report (at their
  sample counts: tens of thousands, not a 16-image grid).
* **Frechet distance in torchvision's ImageNet Inception-v3**, :func:`frechet_imagenet`: the same formula in
  another network's features (torchvision's ``IMAGENET1K_V1`` weights, a different network and resize). It is
  *not* FID and is not comparable to any FID; logged as ``sample_frechet_imagenet`` (runs logged before the rename
  call it ``sample_fid``).

Scores computed on different feature networks are not comparable: compare KID values only between runs that
share one feature net (same domain, seed and epochs).

Images everywhere are ``[N, C, H, W]`` float tensors normalised as the domain's datasets are (``[-1, 1]`` for
``mean = std = 0.5``, the DDPM convention).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from sophon_ray.core.data import batches, labels_of, split_off
from sophon_ray.modes import build_model
from sophon_ray.modes.classification.models import Net
from sophon_ray.spec import ModelSpec, PretrainSpec
from sophon_ray.core.training import pretrain
from sophon_ray.modes.classification.task import CLASSIFICATION

FEATURE_NET_ARCH = "convnet"
FEATURE_NET_VAL_FRACTION = 0.1  # of the training split, held out to report the feature net's accuracy
CONFIDENT = 0.9  # max-softmax probability at or above which a sample counts as confidently recognised
INCEPTION_FILE = "inception_v3_google-0cc3c7bd.pth"  # torchvision's IMAGENET1K_V1 checkpoint name
INCEPTION_SIZE = 299


# ------------------------------------------------------------------------------------------ feature net
@dataclass
class FeatureNet:
    """A small classifier of the restricted domain, used as the feature extractor of KID and the judge of
    recognisability. ``val_accuracy`` (%) is its accuracy on the held-out 10% of the training split: a KID
    measured in the features of a net that cannot tell the classes apart says little."""

    model: Net
    channels: int
    image_size: int
    num_classes: int
    val_accuracy: float

    def _check(self, x: Tensor) -> None:
        want = (self.channels, self.image_size, self.image_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != want:
            raise ValueError(f"samples: expected images [N, {want[0]}, {want[1]}, {want[2]}] (the feature net's "
                             f"channels and image_size), got {list(x.shape)}; sample at the domain's image_size "
                             "and channels, or train the feature net for the samples' shape")

    @torch.no_grad()
    def _run(self, x: Tensor, head: bool, batch_size: int = 512) -> Tensor:
        self._check(x)
        was_training = self.model.training
        self.model.eval()
        layers = self.model.classifier if head else self.model.classifier[:-1]
        device = next(self.model.parameters()).device
        out = [layers(self.model.body(chunk.to(device))).float().cpu() for chunk in x.split(batch_size)]
        self.model.train(was_training)
        return torch.cat(out) if out else torch.empty(0, self.num_classes if head else self.feature_dim)

    @property
    def feature_dim(self) -> int:
        return self.model.head.in_features

    def features(self, x: Tensor) -> Tensor:
        """Penultimate-layer activations ``[N, D]``: the body's pooled features through the classifier's hidden
        Linear + ReLU (D = 64 for the convnet), in eval mode."""
        return self._run(x, head=False)

    def logits(self, x: Tensor) -> Tensor:
        """Class logits ``[N, num_classes]``, in eval mode."""
        return self._run(x, head=True)


def train_feature_net(train: Dataset, channels: int, image_size: int, num_classes: int, seed: int,
                      epochs: int = 8, lr: float = 3e-3, batch_size: int = 64) -> FeatureNet:
    """Train the registry's ``convnet`` on ``train`` (``(x, label)`` pairs, the restricted domain's training
    split) with the project's one training loop (:func:`sophon_ray.core.training.pretrain`, Adam), holding out a
    stratified 10% to report its accuracy. Deterministic for a seed (the global RNG is forked, not touched);
    about 2-3 s on one idle CPU core for scikit-learn's digits at 16 px (95-99% held-out accuracy)."""
    if len(train) < 2 * num_classes:
        raise ValueError(f"train: {len(train)} samples are too few to train a {num_classes}-class feature net; "
                         "pass the restricted domain's whole training split")
    fit, val = split_off(train, FEATURE_NET_VAL_FRACTION, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model(ModelSpec(FEATURE_NET_ARCH, num_classes), channels, image_size)
        pretrain(model, fit, val, PretrainSpec(epochs=epochs, optimizer="adam", lr=lr, batch_size=batch_size),
                 seed=seed, task=CLASSIFICATION)
    net = FeatureNet(model.eval(), channels, image_size, num_classes, val_accuracy=0.0)
    correct = (net.logits(dataset_images(val)).argmax(-1) == labels_of(val)).double().mean()
    net.val_accuracy = 100.0 * float(correct)
    return net


def dataset_images(dataset: Dataset, batch_size: int = 512) -> Tensor:
    """Every image of a dataset stacked into one tensor ``[N, C, H, W]``, in order."""
    return torch.cat([x for x, _ in batches(dataset, batch_size, shuffle=False)])


# ------------------------------------------------------------------------------------------------ KID
def _polynomial_mmd(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 between two equal-size sets with the kernel k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_xy.mean()


def kid(real_feats: Tensor, fake_feats: Tensor, subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: the unbiased MMD^2 between real and generated features with the cubic
    polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over ``subsets`` random subsets of ``subset_size``
    samples of each set (drawn without replacement; capped at the smaller set's size), as torch-fidelity and
    clean-fid compute it. Returns (mean, std over subsets). 0 means the same distribution; being unbiased it can
    come out slightly negative for close sets. Computed in float64."""
    if real_feats.dim() != 2 or fake_feats.dim() != 2 or real_feats.shape[1] != fake_feats.shape[1]:
        raise ValueError(f"kid: features must be [N, D] with the same D, got {list(real_feats.shape)} and "
                         f"{list(fake_feats.shape)}")
    size = min(subset_size, len(real_feats), len(fake_feats))
    if size < 2:
        raise ValueError(f"kid: needs at least 2 samples in each set, got {len(real_feats)} real and "
                         f"{len(fake_feats)} generated; generate more samples")
    x, y = real_feats.double(), fake_feats.double()
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(subsets):
        xi = torch.randperm(len(x), generator=gen)[:size]
        yi = torch.randperm(len(y), generator=gen)[:size]
        scores.append(_polynomial_mmd(x[xi], y[yi]))
    values = torch.stack(scores)
    return float(values.mean()), float(values.std(unbiased=False))


# ------------------------------------------------------------------------------------ recognisability
def recognisability(feature_net: FeatureNet, samples: Tensor) -> dict[str, float]:
    """How recognisable generated samples are to the restricted domain's classifier:

    * ``confidence``: the mean max-softmax probability (1/num_classes for noise the net cannot place, near 1
      for clear members of some class);
    * ``confident_share``: the share of samples whose max-softmax probability is >= 0.9;
    * ``class_entropy``: the entropy of the histogram of predicted classes divided by log(num_classes), in
      [0, 1]: 1 when every class is predicted equally often, 0 when all samples fall into one class (mode
      collapse).

    A generator that makes clear samples of every class scores high on all three.
    """
    probs = feature_net.logits(samples).softmax(dim=-1)
    top = probs.max(dim=-1)
    counts = torch.bincount(top.indices, minlength=feature_net.num_classes).double()
    share = counts / counts.sum()
    entropy = -(share[share > 0] * share[share > 0].log()).sum()
    return {"confidence": float(top.values.mean()),
            "confident_share": float((top.values >= CONFIDENT).double().mean()),
            "class_entropy": float(entropy / math.log(feature_net.num_classes)) if feature_net.num_classes > 1
            else 0.0}


def sample_quality(feature_net: FeatureNet, real: Dataset, fake: Tensor, subsets: int = 100,
                   subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """The offline quality scores of generated images ``fake`` against the real images of ``real`` (the
    restricted domain's test split): ``kid``/``kid_std`` in the feature net's features (lower is better) and
    :func:`recognisability`'s ``confidence``, ``confident_share`` and ``class_entropy`` (higher is better)."""
    kid_mean, kid_std = kid(feature_net.features(dataset_images(real)), feature_net.features(fake), subsets,
                            subset_size, seed)
    return {"kid": kid_mean, "kid_std": kid_std, **recognisability(feature_net, fake)}


# ------------------------------------------------------------------------------------------------ FID
def feature_stats(feats: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, float64) of features ``[N, D]``."""
    arr = feats.detach().double().cpu().numpy()
    return arr.mean(axis=0), np.cov(arr, rowvar=False)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """The symmetric square root of a covariance (eigenvalues below 0 from rounding clipped to 0)."""
    values, vectors = np.linalg.eigh((sigma + sigma.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2)).

    The trace of the matrix square root is taken as sum_i sqrt(lambda_i) over the eigenvalues of the symmetric
    PSD matrix sigma1^(1/2) sigma2 sigma1^(1/2), which are those of sigma1 sigma2: the same number pytorch-fid
    gets from ``scipy.linalg.sqrtm(sigma1 @ sigma2)`` on well-conditioned covariances, but always real (no
    complex parts or ``eps`` offset) when they are singular, as 2048-d covariances of fewer than 2049 samples
    are, and ~3x faster at 2048-d (symmetric eigendecompositions instead of a Schur decomposition).
    """
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)) or mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means {mu1.shape}, {mu2.shape} and covariances {sigma1.shape}, "
                         f"{sigma2.shape} do not describe two Gaussians of one dimension")
    root = _psd_sqrt(sigma1)
    product = root @ sigma2 @ root
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((product + product.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def inception_weight_candidates(weights: str | Path | None) -> list[Path]:
    """Where :func:`frechet_imagenet` looks for torchvision's ImageNet Inception-v3 weights: the given file, else
    torchvision's download cache (``torch.hub.get_dir()/checkpoints/inception_v3_google-0cc3c7bd.pth``, under
    TORCH_HOME when set)."""
    if weights is not None:
        return [Path(weights).expanduser()]
    return [Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]


def find_inception_weights(weights: str | Path | None) -> Path | None:
    """The first existing file of :func:`inception_weight_candidates`, or None."""
    return next((p for p in inception_weight_candidates(weights) if p.is_file()), None)


def imagenet_unavailable_message(weights: str | Path | None) -> str:
    """What to log when :func:`frechet_imagenet` returns None."""
    where = ", ".join(str(p) for p in inception_weight_candidates(weights))
    return (f"sample_frechet_imagenet unavailable: no torchvision ImageNet Inception-v3 weights at {where}; fix: copy "
            f"torchvision's {INCEPTION_FILE} (download.pytorch.org/models) there, or set "
            "generation.imagenet_inception to its path")


def inception_features(weights: Path, device: torch.device | str = "cpu") -> nn.Module:
    """torchvision's ImageNet Inception-v3 with the weights at ``weights`` (a torchvision state dict), returning the
    2048-d pool features (the classifier replaced by identity), in eval mode. Inputs in [-1, 1] at 299 px:
    the scale the ported Google weights expect (what ``transform_input`` converts ImageNet-normalised input to)."""
    from torchvision.models import Inception3  # noqa: PLC0415

    net = Inception3(aux_logits=True, transform_input=False, init_weights=False)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"imagenet_inception: {weights} is not a torchvision inception_v3 state dict "
                         f"({str(err)[:200]}); use torchvision's {INCEPTION_FILE} (the standard FID network's "
                         "weights go to generation.fid_inception)") from err
    net.fc = nn.Identity()
    net.aux_logits, net.AuxLogits = False, None
    return net.eval().to(device)


@torch.no_grad()
def _pool_features(net: nn.Module, images: Tensor, device: torch.device | str, batch_size: int) -> Tensor:
    out = []
    for chunk in images.split(batch_size):
        x = chunk.to(device).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        out.append(net(x).double().cpu())
    return torch.cat(out)


def _check_images(images: Tensor, name: str, what: str) -> None:
    if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) < 2:
        raise ValueError(f"{what}: {name} must be at least 2 images [N, 1 or 3, H, W], got {list(images.shape)}")


def frechet_imagenet(real: Tensor, fake: Tensor, weights: str | Path | None, device: torch.device | str = "cpu",
                     batch_size: int = 64) -> float | None:
    """The Frechet distance between real and generated images (``[N, 1 or 3, H, W]`` in [-1, 1]; 1 channel is
    replicated to 3, every image resized to 299 px) in torchvision's ImageNet Inception-v3 pool features: FID's
    formula in another network, so not FID (:func:`fid` is). ``weights``: a local torchvision ``inception_v3``
    state dict, or None for torchvision's cache. Returns None when no weights file exists (log
    :func:`imagenet_unavailable_message`); never downloads. Small sets bias it upwards."""
    path = find_inception_weights(weights)
    if path is None:
        return None
    for name, images in (("real", real), ("fake", fake)):
        _check_images(images, name, "frechet_imagenet")
    net = inception_features(path, device)
    real_stats = _cached_stats(("imagenet", path), real, lambda: feature_stats(_pool_features(net, real, device,
                                                                                               batch_size)))
    fake_stats = feature_stats(_pool_features(net, fake, device, batch_size))
    return frechet_distance(*real_stats, *fake_stats)


# ------------------------------------------------------------------------------------------- standard FID
_FID_NETS: dict[tuple[str, int, str], nn.Module] = {}
_REAL_STATS: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _file_key(path: Path) -> tuple[str, int]:
    path = path.expanduser().resolve()
    return str(path), path.stat().st_mtime_ns


def _cached_stats(kind: tuple[str, Path], real: Tensor, compute) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The real images' feature statistics, computed once per process for a network file and image set (every
    attack trial of a sweep scores against the same test split)."""
    key = (kind[0], *_file_key(kind[1]), hashlib.sha1(real.detach().cpu().contiguous().numpy().tobytes()).hexdigest())
    if key not in _REAL_STATS:
        _REAL_STATS[key] = compute()
    return _REAL_STATS[key]


def fid_network(weights: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The standard FID Inception network with the weights at ``weights`` (:func:`.fid_inception.load_fid_inception`:
    InceptionWeightsError naming the file and the fix when it is missing or another network), loaded once per
    process, file and device."""
    from sophon_ray.modes.generation.fid_inception import load_fid_inception  # noqa: PLC0415

    path = Path(weights).expanduser()
    key = (*_file_key(path), str(device)) if path.is_file() else None
    if key is None or key not in _FID_NETS:
        net = load_fid_inception(path, device)   # raises for a missing file
        _FID_NETS[(*_file_key(path), str(device))] = net
        return net
    return _FID_NETS[key]


def to_unit_range(images: Tensor, mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,)) -> Tensor:
    """Images normalised as the domain's datasets are (``mean``/``std`` per channel or one for all) as what the
    standard FID pipeline reads: RGB in [0, 1] on the 8-bit grid (pytorch-fid scores image files: ``x / 255``), one
    channel replicated to three, values outside the range clipped."""
    x = images.detach().float().cpu()
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    x = (x * s + m).clamp(0, 1)
    x = torch.round(x * 255) / 255
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


@torch.no_grad()
def fid_features(net: nn.Module, images: Tensor, device: torch.device | str = "cpu", batch_size: int = 64,
                 mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,)) -> Tensor:
    """The standard FID network's 2048-d pool features ``[N, 2048]`` (float64) of ``images`` (see
    :func:`to_unit_range`; the network resizes to 299 px and scales to [-1, 1] itself)."""
    x = to_unit_range(images, mean, std)
    return torch.cat([net(chunk.to(device)).double().cpu() for chunk in x.split(batch_size)])


def fid(real: Tensor, fake: Tensor, weights: str | Path, device: torch.device | str = "cpu", batch_size: int = 64,
        mean: tuple[float, ...] = (0.5,), std: tuple[float, ...] = (0.5,)) -> float:
    """FID (Heusel et al. 2017) between real and generated images (``[N, 1 or 3, H, W]``, normalised by ``mean``/
    ``std``: [-1, 1] for the DDPM convention's 0.5/0.5) in the standard FID Inception network's 2048-d pool features,
    the network of pytorch-fid and torch-fidelity (``weights``: a local copy of its state dict, e.g.
    ``pt_inception-2015-12-05-6726825d.pth``; InceptionWeightsError naming the file and the fix otherwise). Images
    go in as image files would (8-bit RGB in [0, 1]). Meaningful at thousands of samples per set; small sets bias
    it upwards, so compare only values computed at equal sample counts."""
    for name, images in (("real", real), ("fake", fake)):
        _check_images(images, name, "fid")
    net = fid_network(weights, device)
    path = Path(weights).expanduser()
    real_stats = _cached_stats(("fid", path), real, lambda: feature_stats(fid_features(net, real, device, batch_size,
                                                                                      mean, std)))
    fake_stats = feature_stats(fid_features(net, fake, device, batch_size, mean, std))
    return frechet_distance(*real_stats, *fake_stats)


def inception_scores(real: Tensor, fake: Tensor, imagenet_weights: str | Path | None, fid_weights: str | Path | None,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """The Inception-based scores whose weights are here: ``fid_standard`` (:func:`fid`) when ``fid_weights`` is
    set, ``frechet_imagenet`` (:func:`frechet_imagenet`) when torchvision's ImageNet weights are at
    ``imagenet_weights`` or in torchvision's cache. A set ``fid_weights`` that is missing or not the FID network
    raises (the spec asked for FID); absent ImageNet weights just leave their score out."""
    out: dict[str, float] = {}
    if fid_weights is not None:
        out["fid_standard"] = fid(real, fake, fid_weights, device)
    score = frechet_imagenet(real, fake, imagenet_weights, device)
    if score is not None:
        out["frechet_imagenet"] = score
    return out
