"""experiments/weight_distance.py: distances between a sweep's normal and protected weights."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
_loader = importlib.util.spec_from_file_location("weight_distance", ROOT / "experiments" / "weight_distance.py")
weights = importlib.util.module_from_spec(_loader)
_loader.loader.exec_module(weights)
distance_table, main, render, weight_distance = (weights.distance_table, weights.main, weights.render,
                                                 weights.weight_distance)


def state(w: list[float], steps: int = 0) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.tensor(w), "bn.num_batches_tracked": torch.tensor(steps)}


def test_the_distance_is_l2_over_floating_tensors_relative_to_the_first_models_norm():
    l2, rel = weight_distance(state([3.0, 4.0]), state([3.0, 0.0], steps=7))  # the integer counter is left out
    assert l2 == pytest.approx(4.0) and rel == pytest.approx(4.0 / 5.0)
    with pytest.raises(ValueError, match="differ in their tensors"):
        weight_distance(state([1.0]), {"other": torch.tensor([1.0])})


def test_every_protected_model_against_normal_then_models_of_one_seed_against_each_other():
    states = {"normal": state([1.0, 0.0]), "protected/dos/s0": state([1.0, 1.0]),
              "protected/ntr/s0": state([1.0, 2.0]), "protected/dos/s1": state([0.0, 0.0])}
    table = distance_table(states)
    pairs = {(r.model, r.against): r.l2 for r in table.itertuples()}
    assert pairs == {("protected/dos/s0", "normal"): 1.0, ("protected/dos/s1", "normal"): 1.0,
                     ("protected/ntr/s0", "normal"): 2.0, ("protected/ntr/s0", "protected/dos/s0"): 1.0}
    assert "| protected/ntr/s0 | protected/dos/s0 | 1 | 0.707 |" in render(table)
    assert math.isclose(table.relative.iloc[0], 1.0)


def test_a_sweep_without_its_checkpoints_is_a_user_error_naming_the_models_and_the_fix(tmp_path, capsys):
    spec = tmp_path / "s.yaml"   # a shipped sweep never run into this output folder
    spec.write_text((ROOT / "sweeps" / "dos_alone.yaml").read_text() + f"output_dir: {tmp_path / 'out'}\n")
    assert main([str(spec)]) == 2
    err = capsys.readouterr().err
    assert "no checkpoint for normal, protected/dos-alone/s0" in err and "sophon-ray run" in err
