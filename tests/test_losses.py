import math

import pytest
import torch
import torch.nn.functional as F

from sophon_ray.modes.classification.losses import LOSSES, ice, ice_code, klu


def test_ice_value_matches_closed_form():
    z = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]])
    y = torch.tensor([0, 2])
    p = z.softmax(-1)
    expected = -torch.log(1 - p[torch.arange(2), y]).mean()
    assert torch.allclose(ice(z, y), expected, atol=1e-6)


def test_ice_gradient_matches_closed_form():
    z = torch.tensor([[2.0, -1.0, 0.5, 0.0]], requires_grad=True)
    y = torch.tensor([2])
    ice(z, y).backward()
    p = z.detach().softmax(-1)[0]
    py = p[2]
    expected = -p * py / (1 - py)  # d/dz_j for j != y
    expected[2] = py              # d/dz_y = p_y
    assert torch.allclose(z.grad[0], expected, atol=1e-6)


def test_ice_is_stable_where_the_naive_form_overflows():
    z = torch.tensor([[80.0, -80.0, 0.0]], requires_grad=True)
    loss = ice(z, torch.tensor([0]))
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(80.0, abs=1e-3)
    assert torch.isfinite(z.grad).all()


def test_ice_saturates_when_the_task_fails():
    z = torch.tensor([[-30.0, 5.0, 5.0]], requires_grad=True)
    ice(z, torch.tensor([0])).backward()
    assert z.grad.abs().max() < 1e-10


def test_ice_code_is_cross_entropy_of_one_minus_logits():
    z = torch.randn(5, 4)
    y = torch.randint(0, 4, (5,))
    assert torch.allclose(ice_code(z, y), F.cross_entropy(1 - z, y))


@pytest.mark.parametrize("num_classes", [2, 3, 10, 37])
def test_klu_value_and_gradient_match_closed_form(num_classes):
    z = torch.randn(4, num_classes, requires_grad=True)
    loss = klu(z)
    p = z.detach().softmax(-1)
    expected = (-(torch.log(num_classes * p)).mean(-1)).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    loss.backward()
    assert torch.allclose(z.grad, (p - 1 / num_classes) / 4, atol=1e-6)


def test_klu_is_zero_at_uniform_and_needs_no_labels():
    assert klu(torch.zeros(3, 7)).abs().item() < 1e-6


def test_registry_names_and_did_you_mean():
    assert set(LOSSES.names()) == {"ice", "ice_code", "klu"}
    with pytest.raises(KeyError, match="did you mean 'klu'"):
        LOSSES.get("kul")
