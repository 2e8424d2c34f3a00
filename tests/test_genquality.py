"""Sample-quality scores: KID against a direct O(n^2) reference, the Frechet distance on closed-form
Gaussians, a real feature net trained on scikit-learn's digits, and the torchvision ImageNet Frechet distance's
missing-weights path (the standard FID network: tests/test_fid_inception.py)."""

import math

import numpy as np
import pytest
import torch

from sophon_ray.core.data import load_domain
from sophon_ray.modes.generation.quality import (dataset_images, feature_stats, find_inception_weights,
                                                 frechet_distance, frechet_imagenet, imagenet_unavailable_message, kid,
                                                 recognisability, sample_quality, train_feature_net)
from sophon_ray.spec import DomainSpec


def reference_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, written out pair by pair."""
    m, d = x.shape
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_a_direct_reference_on_whole_sets_and_on_subsets():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 5, generator=gen), torch.randn(12, 5, generator=gen) + 0.5
    mean, std = kid(x, y, subsets=3, subset_size=12)  # subsets are the whole sets, permuted
    assert mean == pytest.approx(reference_mmd(x.double().numpy(), y.double().numpy()), rel=1e-9)
    assert std == pytest.approx(0, abs=1e-12)
    # subsets of 6: the same draws (real indices, then fake indices, per subset) through the reference
    mean, std = kid(x, y, subsets=4, subset_size=6, seed=3)
    draw = torch.Generator().manual_seed(3)
    ref = []
    for _ in range(4):
        xi, yi = torch.randperm(12, generator=draw)[:6], torch.randperm(12, generator=draw)[:6]
        ref.append(reference_mmd(x[xi].double().numpy(), y[yi].double().numpy()))
    assert mean == pytest.approx(np.mean(ref), rel=1e-9) and std == pytest.approx(np.std(ref), rel=1e-9)


def test_kid_is_near_zero_for_one_distribution_symmetric_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(1)
    a, b = torch.randn(400, 16, generator=gen), torch.randn(400, 16, generator=gen)
    far, _ = kid(a, b + 0.5, subsets=10, subset_size=100)
    # a whole set against itself: the unbiased estimator leaves out k(x, x) within but not across, so
    # it is slightly negative, -2 (mean diagonal - mean off-diagonal kernel) / m, tiny next to a shift
    same, same_std = kid(a, a, subsets=2, subset_size=400)
    k = (a.double() @ a.double().T / 16 + 1) ** 3
    off_diagonal = (k.sum() - k.diagonal().sum()) / (400 * 399)
    assert same == pytest.approx(float(2 * (off_diagonal - k.mean())), rel=1e-9) and same_std < 1e-12
    assert -0.1 * far < same < 0
    iid, iid_std = kid(a, b, subsets=10, subset_size=100)  # two samples of one distribution: ~0
    assert abs(iid) < 2 * iid_std and abs(iid) < 0.02 * far
    # symmetric: exactly on whole sets; on random subsets the draws differ, so within the subsets' spread
    assert kid(a, b + 0.7, subsets=1, subset_size=400)[0] == pytest.approx(kid(b + 0.7, a, subsets=1,
                                                                                  subset_size=400)[0], rel=1e-9)
    (ab, ab_std), (ba, ba_std) = (kid(a, b + 0.7, subsets=10, subset_size=100),
                                  kid(b + 0.7, a, subsets=10, subset_size=100))
    assert abs(ab - ba) < 2 * (ab_std + ba_std) / math.sqrt(10)
    scores = [kid(a, b + shift, subsets=10, subset_size=100)[0] for shift in (0.25, 0.5, 1.0, 2.0)]
    assert scores[0] > 5 * abs(iid) and all(lo < hi for lo, hi in zip(scores, scores[1:])), scores


def test_kid_rejects_mismatched_or_tiny_sets():
    with pytest.raises(ValueError, match="same D"):
        kid(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        kid(torch.zeros(5, 3), torch.zeros(1, 3))


def test_frechet_distance_on_closed_form_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    sigma = a @ a.T + np.eye(6)  # a full positive-definite covariance
    mu = rng.normal(size=6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-6)
    shift = np.arange(6.0)
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(shift @ shift, rel=1e-6)
    d1, d2 = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])  # diagonal: sum (sqrt(a) - sqrt(b))^2
    expected = np.sum((np.sqrt(d1) - np.sqrt(d2)) ** 2) + 2.0 ** 2
    assert frechet_distance(np.zeros(3), np.diag(d1), np.array([2.0, 0, 0]), np.diag(d2)) == pytest.approx(expected)


def test_frechet_distance_agrees_with_scipy_sqrtm_and_survives_singular_covariances():
    from scipy import linalg

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(200, 8)), rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8)) + 1.0
    (m1, s1), (m2, s2) = feature_stats(torch.from_numpy(x)), feature_stats(torch.from_numpy(y))
    pytorch_fid = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(pytorch_fid, rel=1e-8)
    few = torch.from_numpy(rng.normal(size=(3, 64)))  # rank-2 covariance in 64 dimensions
    mu, sigma = feature_stats(few)
    # ~0 up to sqrt(rounding error) per null direction (scipy's sqrtm warns "singular" here)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def test_frechet_imagenet_without_inception_weights_returns_none_and_says_where(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    images = torch.zeros(2, 3, 8, 8)
    assert find_inception_weights(missing) is None
    assert frechet_imagenet(images, images, missing) is None
    message = imagenet_unavailable_message(missing)
    assert message.startswith("sample_frechet_imagenet unavailable: no torchvision ImageNet Inception-v3 weights at ")
    assert str(missing) in message and "generation.imagenet_inception" in message


@pytest.fixture(scope="module")
def digits():
    spec = DomainSpec(dataset="digits", image_size=16, channels=1)
    return load_domain(spec)


@pytest.fixture(scope="module")
def feature_net(digits):
    torch.set_num_threads(1)
    return train_feature_net(digits[0], channels=1, image_size=16, num_classes=10, seed=0)


def test_feature_net_learns_digits_and_is_deterministic(digits, feature_net):
    assert feature_net.val_accuracy > 85
    test_images = dataset_images(digits[1])
    assert feature_net.features(test_images).shape == (len(digits[1]), 64)
    logits = feature_net.logits(test_images)
    accuracy = (logits.argmax(-1) == digits[1].tensors[1]).double().mean()
    assert accuracy > 0.85
    # the seed alone decides the net, whatever the global RNG's state, which is left as it was
    torch.manual_seed(123)
    again = train_feature_net(digits[0], channels=1, image_size=16, num_classes=10, seed=0, epochs=1)
    after = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(3))
    twice = train_feature_net(digits[0], channels=1, image_size=16, num_classes=10, seed=0, epochs=1)
    other = train_feature_net(digits[0], channels=1, image_size=16, num_classes=10, seed=1, epochs=1)
    assert torch.equal(again.features(test_images), twice.features(test_images))
    assert not torch.equal(again.features(test_images), other.features(test_images))
    with pytest.raises(ValueError, match="image_size"):
        feature_net.features(torch.zeros(2, 3, 16, 16))


def test_sample_quality_ranks_real_digits_above_noise_and_collapse(digits, feature_net):
    train, test = digits
    real_fakes = dataset_images(train)[:300]  # other real digits: what a perfect generator makes
    noise = torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    collapsed = real_fakes[digits[0].tensors[1][:300] == 3][:1].expand(300, -1, -1, -1)  # one image, repeated
    good = sample_quality(feature_net, test, real_fakes, subsets=20, subset_size=200)
    bad = sample_quality(feature_net, test, noise, subsets=20, subset_size=200)
    mode = sample_quality(feature_net, test, collapsed, subsets=20, subset_size=200)
    assert set(good) == {"kid", "kid_std", "confidence", "confident_share", "class_entropy"}
    assert abs(good["kid"]) < 0.1 * bad["kid"] and good["kid"] < 0.1 * mode["kid"]
    assert good["confidence"] > 0.85 and good["confident_share"] > 0.75 and good["class_entropy"] > 0.95
    assert bad["confident_share"] < good["confident_share"]
    assert mode["class_entropy"] == 0.0


def test_recognisability_in_closed_form(digits, feature_net):
    images = dataset_images(digits[1])
    blends = 0.5 * images[:100] + 0.5 * images[100:200]  # two digits overlaid: some confident, some not
    mixed = torch.cat([images[:100], blends])
    probs = feature_net.logits(mixed).softmax(-1).max(-1).values
    assert (probs >= 0.9).double().mean() != (probs >= 0.5).double().mean()  # the threshold matters here
    scores = recognisability(feature_net, mixed)
    assert scores["confidence"] == pytest.approx(float(probs.mean()), rel=1e-6)
    assert scores["confident_share"] == pytest.approx(float((probs >= 0.9).double().mean()))
    assert recognisability(feature_net, images[:1].expand(4, -1, -1, -1))["class_entropy"] == 0.0  # one class
    predicted = feature_net.logits(images).argmax(-1)
    two = torch.cat([images[predicted == 0][:1], images[predicted == 1][:1]])  # one image of each of 2 classes
    assert recognisability(feature_net, two)["class_entropy"] == pytest.approx(math.log(2) / math.log(10))


@pytest.mark.slow
def test_frechet_imagenet_plumbing_with_random_inception_weights(tmp_path):
    """The real Inception-v3, with random weights whose BatchNorm statistics are calibrated on a few random
    images (so activations keep a sane scale) and saved as a local file: 1- and 3-channel tiny images are
    replicated, resized and pooled to 2048-d features; a set against itself scores ~0, against others more."""
    from torchvision.models import Inception3

    from sophon_ray.modes.generation.quality import _pool_features, inception_features

    torch.manual_seed(0)
    net = Inception3(aux_logits=True, init_weights=False)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # running statistics = the calibration batch's
    with torch.no_grad():
        net.train()(torch.rand(4, 3, 299, 299) * 2 - 1)
    path = tmp_path / "inception.pth"
    torch.save(net.state_dict(), path)
    gen = torch.Generator().manual_seed(0)
    real = torch.rand(3, 1, 16, 16, generator=gen) * 2 - 1
    other = torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1
    feats = _pool_features(inception_features(path), real, "cpu", batch_size=2)
    assert feats.shape == (3, 2048) and feats.std(dim=0).max() > 0
    apart = frechet_imagenet(real, other, path)
    assert apart > 0 and abs(frechet_imagenet(real, real, path)) < 1e-6 * apart
