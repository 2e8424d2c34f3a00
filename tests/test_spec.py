import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sophon_ray.recipes import grid_configs
from sophon_ray.cli import main
from sophon_ray.spec import GridSpec, ProtectSpec, SpecError, SweepSpec, apply_overrides, spec_hash
from sophon_ray.run.validate import advisories, load_spec, parse_spec

SWEEPS = sorted(Path(__file__).parents[1].joinpath("sweeps").glob("*.yaml"))

BAD = {
    "name": "bad",
    "pretrian": {"epochs": 1},                                     # unknown key
    "model": {"arch": "resnet81", "num_classes": "ten"},          # unknown arch, wrong type
    "original": {"dataset": "shapes", "image_size": 16},
    "restricted": [{"dataset": "cifar1O", "image_size": 32}],      # unknown dataset, size mismatch
    "pretrain": {"lr": -0.1},                                      # negative lr
    "protect": [{"loss": "icee", "query_fraction": 1.5, "environments": {"optimizers": ["adamm"], "lr": [1e-2, 1e-3]}}],
    "attack": {"subjects": ["protectd"], "evaluation": {"strategy": [], "optimizer": ["sgdd"], "lr": [0]}},
}


def test_every_shipped_sweep_validates():
    assert SWEEPS, "no sweeps shipped"
    for path in SWEEPS:
        load_spec(path)


def test_a_bad_spec_reports_every_problem_at_once():
    with pytest.raises(SpecError) as info:
        parse_spec(BAD)
    text = str(info.value)
    expected = [
        ("pretrian", "did you mean 'pretrain'"),
        ("model.num_classes", "expected an integer"),
        ("model.arch", "did you mean 'resnet18'"),
        ("restricted.0.dataset", "did you mean 'cifar10'"),
        ("restricted.0.image_size", "must match original"),
        ("pretrain.lr", "must be > 0"),
        ("protect.0.loss", "did you mean 'ice'"),
        ("protect.0.query_fraction", "(0, 1)"),
        ("protect.0.environments.optimizers.0", "did you mean 'adam'"),
        ("protect.0.environments.lr", "low <= high"),
        ("attack.subjects.0", "did you mean 'protected'"),
        ("attack.evaluation.0.strategy", "is empty"),
        ("attack.evaluation.0.optimizer.0", "did you mean 'sgd'"),
        ("attack.evaluation.0.lr.0", "must be > 0"),
    ]
    for path, message in expected:
        assert any(p.path == path and message in p.message for p in info.value.problems), (path, text)
    assert len(info.value.problems) >= len(expected)


def test_defaults_yaml_and_overrides_take_precedence_in_order(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "protect": [{"alpha": 2, "beta": 3}, {"name": "b", "loss": "klu"}],
                                    "attack": {"evaluation": [{"lr": [0.5]}]}}))
    spec = load_spec(path, ["protect.0.alpha=5", "attack.evaluation.0.lr=[1e-4, 1e-3]"])
    assert spec.protect[0].alpha == 5.0                       # override beats YAML
    assert spec.protect[0].beta == 3.0                        # YAML beats default
    assert spec.protect[1].alpha == ProtectSpec().alpha == 3.0 and spec.protect[1].loss == "klu"  # default kept
    assert spec.attack.evaluation[0].lr == (1e-4, 1e-3)


def test_scalars_are_accepted_where_lists_are_expected():
    spec = parse_spec({"restricted": {"dataset": "digits"}, "attack": {"evaluation": {"optimizer": "adam"}}})
    assert spec.restricted[0].dataset == "digits" and spec.attack.evaluation[0].optimizer == ("adam",)


def test_a_grid_list_is_the_union_of_its_grids_each_cell_once():
    a = GridSpec(strategy=("direct-all",), optimizer=("sgd", "adam"), lr=(1e-3,))
    b = GridSpec(strategy=("direct-all",), optimizer=("adam",), lr=(1e-3,), batch_size=(32, 128))
    configs = grid_configs([a, b])
    assert len(configs) == 3 and len(set(configs)) == 3   # (adam, 32) is in both grids: listed once
    assert {(c.optimizer, c.batch_size) for c in configs} == {("sgd", 32), ("adam", 32), ("adam", 128)}


def test_a_probe_that_is_also_an_evaluation_cell_is_warned_about(tmp_path, capsys):
    clean = parse_spec({"attack": {"evaluation": {"strategy": ["initfc-all"], "optimizer": ["momentum"],
                                                  "lr": [1e-2], "batch_size": [64]}}})
    probes = lambda spec: [w for w in advisories(spec) if ".probes." in w.path]  # noqa: E731
    assert probes(clean) == []
    leaky = parse_spec({"attack": {"evaluation": {"strategy": ["initfc-all"], "optimizer": ["momentum"],
                                                  "lr": [3e-3], "batch_size": [64]}}})
    [warning] = probes(leaky)
    assert warning.path == "protect.0.probes.0" and "also an evaluation cell" in warning.message
    path = tmp_path / "leaky.yaml"
    path.write_text(yaml.safe_dump({"attack": {"evaluation": {"lr": [3e-3], "batch_size": [64]}}}))
    assert main(["validate", str(path)]) == 0
    assert "warning: protect.0.probes.0" in capsys.readouterr().out


def test_the_spec_module_imports_no_registry_and_no_torch():
    code = "import sys, sophon_ray.spec; print(sorted(m for m in sys.modules if m.startswith(('torch', 'sophon_ray'))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "torch" not in out and "registries" not in out, out


def test_bad_override_is_reported():
    with pytest.raises(SpecError, match="KEY=VALUE"):
        apply_overrides({}, ["protect.0.alpha"])
    with pytest.raises(SpecError, match="cannot set"):
        apply_overrides({"protect": []}, ["protect.3.alpha=1"])
    with pytest.raises(SpecError, match="list items must exist"):
        apply_overrides({}, ["restricted.0.image_size=16"])


def test_spec_hash_is_stable_and_sensitive():
    a, b = parse_spec({}), parse_spec({"seed": 1})
    assert spec_hash(a) == spec_hash(parse_spec({})) != spec_hash(b)
    assert spec_hash(a.pretrain) == spec_hash(b.pretrain)


def test_cli_validate_exits_2_and_prints_every_problem(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(BAD))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "problem(s)" in err and "did you mean 'pretrain'" in err and "attack.evaluation.0.lr.0" in err
    assert main(["validate", str(SWEEPS[0])]) == 0


def test_missing_spec_file_names_the_path(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")
