"""Bad input: a clear message naming the problem and the fix, exit code 2, before Ray starts, nothing
half-written (no MLflow runs, no checkpoints).

The cases run the CLI's ``main`` in this process (with ``ray.init`` made to fail, so "before Ray starts" is checked,
not assumed): a subprocess per case spent ~4 s importing torch, Ray and MLflow to print one line. One test runs the
real CLI as a subprocess, for what only a process shows: the exit status and no traceback on stderr."""

import copy
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sophon_ray import cli
from tests.procenv import process_env

pytestmark = pytest.mark.faults

GOOD = {
    "name": "bad-input",
    "model": {"arch": "convnet", "num_classes": 10},
    "original": {"dataset": "shapes", "image_size": 12, "channels": 3, "train_size": 200, "test_size": 50},
    "restricted": [{"dataset": "shapes_m", "image_size": 12, "channels": 3, "train_size": 200, "test_size": 50}],
    "pretrain": {"epochs": 1},
    "protect": [{"name": "v", "iterations": 2, "inner_steps": 2}],
    "attack": {"evaluation": [{"strategy": ["direct-all"], "optimizer": ["sgd"], "lr": [1e-3], "epochs": [1]}]},
}

GENERATION = {**GOOD, "mode": "generation", "model": {"arch": "unet-tiny"},
              "original": {**GOOD["original"], "image_size": 16, "channels": 1},
              "restricted": [{**GOOD["restricted"][0], "image_size": 16, "channels": 1}],
              "protect": [{"name": "v", "loss": "dos", "iterations": 2, "inner_steps": 2,
                           "environments": {"head_reinit": 0, "head_only": 0},
                           "probes": [{"strategy": "direct-all", "optimizer": "adam", "lr": 1e-3}]}]}


def _with(path: str, value):
    spec = copy.deepcopy(GOOD)
    node = spec
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[int(p)] if isinstance(node, list) else node[p]
    node[int(parts[-1]) if isinstance(node, list) else parts[-1]] = value
    return spec


CASES = {
    "unknown key": (_with("protect.0.alpah", 3), "did you mean 'alpha'"),
    "wrong type": (_with("pretrain.epochs", "five"), "pretrain.epochs: expected an integer"),
    "negative lr": (_with("pretrain.lr", -1e-3), "pretrain.lr: must be > 0"),
    "zero attack lr": (_with("attack.evaluation.0.lr", [0.0]), "attack.evaluation.0.lr.0: must be > 0"),
    "empty grid": (_with("attack.evaluation.0.optimizer", []), "attack.evaluation.0.optimizer: is empty"),
    "unknown dataset": (_with("restricted.0.dataset", "svnh"), "did you mean 'svhn'"),
    "unknown model": (_with("model.arch", "resnet19"), "did you mean 'resnet18'"),
    "unknown loss": (_with("protect.0.loss", "klu2"), "did you mean 'klu'"),
    "unknown strategy": (_with("attack.evaluation.0.strategy", ["initfc_all"]), "did you mean 'initfc-all'"),
    "unknown optimizer": (_with("attack.evaluation.0.optimizer", ["adamw2"]), "did you mean 'adamw'"),
    "unknown subject": (_with("attack.subjects", ["scrach"]), "did you mean 'scratch'"),
    "unknown data pool": (_with("attack.data_pool", "disjunct"), "did you mean 'disjoint'"),
    "attacker pool too large": (_with("attack.pool_fraction", 0.9), "attack.pool_fraction: must be in (0, 0.8)"),
    "no protection seed": (_with("protect.0.seeds", []), "protect.0.seeds: needs at least one protection seed"),
    "unknown probe strategy": (_with("protect.0.probes", [{"strategy": "initfc-al"}]), "did you mean 'initfc-all'"),
    "negative alpha": (_with("protect.0.alpha", -1), "protect.0.alpha: must be >= 0"),  # 0: NTR-only control
    "negative weight decay": (_with("attack.evaluation.0.weight_decay", [-1e-4]), "weight_decay.0: must be >= 0"),
    "bad probability": (_with("protect.0.environments", {"head_reinit": 1.5}), "must be in [0, 1]"),
    "missing data root": (_with("restricted.0", {"dataset": "cifar10", "root": "/nonexistent/cifar", "image_size": 12}),
                          "/nonexistent/cifar"),
    "missing weights": (_with("pretrain.weights", "/nonexistent/ckpt"), "no sophon-ray checkpoint at /nonexistent/ckpt"),
    "unreachable tracking": (_with("tracking", {"uri": "http://127.0.0.1:9"}), "does not answer"),
    "empty search range": (_with("attack.search", [{"space": {"lr": {"low": 1e-2, "high": 1e-2}}}]),
                           "attack.search.0.space.lr: empty range"),
    "search low > high": (_with("attack.search", [{"space": {"lr": {"low": 1e-1, "high": 1e-3}}}]),
                          "attack.search.0.space.lr: low > high"),
    "unknown distribution": (_with("attack.search", [{"space": {"lr": {"distribution": "logunifrom", "low": 1e-3,
                                                                       "high": 1e-1}}}]), "did you mean 'loguniform'"),
    "unknown search algorithm": (_with("attack.search", [{"algorithm": "tpee"}]), "did you mean 'tpe'"),
    "unknown augmentation": (_with("attack.search", [{"space": {"augment": ["flp"]}}]), "did you mean 'flip'"),
    "strategy the model lacks": (_with("attack.search", [{"space": {"strategy": ["last-k"], "blocks": [9]}}]),
                                 "attack.search.0.space.strategy.0"),
    "generation with a classifier": (_with("mode", "generation"),
                                     "model.arch: 'convnet' is a classifier; generation mode needs a denoiser"),
    "DoS loss in classification": (_with("protect.0.loss", "dos"),
                                   "protect.0.loss: 'dos' is a generation loss and this is classification mode"),
    "image size the UNet cannot take": ({**GENERATION, "original": {**GENERATION["original"], "image_size": 18},
                                         "restricted": [{**GENERATION["restricted"][0], "image_size": 18}]},
                                        "original.image_size: Denoiser: image_size 18 must be a multiple of 4"),
    "classifier strategy on a denoiser": ({**GENERATION, "attack": {"evaluation": [
        {"strategy": ["initfc-all"], "optimizer": ["sgd"], "lr": [1e-3], "epochs": [1]}]}},
        "strategy 'initfc-all' does not apply in generation mode"),
}


class Cli:
    """``sophon-ray`` in this process, in ``tmp``, where starting Ray fails the test."""

    def __init__(self, tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
        import ray

        def no_ray(*args, **kwargs):
            raise AssertionError("Ray started")

        monkeypatch.chdir(tmp)
        monkeypatch.setattr(ray, "init", no_ray)
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str]:
        """(exit status, stderr)."""
        self.capsys.readouterr()
        status = cli.main(list(args))
        return status, self.capsys.readouterr().err


@pytest.fixture
def run_cli(tmp_path, monkeypatch, capsys) -> Cli:
    return Cli(tmp_path, monkeypatch, capsys)


def assert_nothing_started(tmp: Path) -> None:
    assert not (tmp / "raytmp").exists(), "Ray started"
    assert not (tmp / "mlflow.db").exists(), "an MLflow store was written"
    assert not list(tmp.rglob("model.safetensors")) or all("given" in str(p) for p in tmp.rglob("model.safetensors"))
    assert not (tmp / "runs").exists(), "an output directory was written"


def test_the_real_cli_exits_2_without_a_traceback_and_starts_nothing(tmp_path):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(CASES["unknown key"][0]))
    for args, message in ((["run", "spec.yaml"], "did you mean 'alpha'"),
                          (["run", "nope.yaml"], "spec file not found")):
        result = subprocess.run([sys.executable, "-m", "sophon_ray.cli", *args], cwd=tmp_path,
                                env=process_env(tmp_path / "raytmp"), text=True, capture_output=True, timeout=120)
        assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
        assert message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert_nothing_started(tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_spec_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, run_cli, case):
    spec, message = CASES[case]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    status, err = run_cli("run", "spec.yaml")
    assert status == 2, (status, err[-2000:])
    assert message in err, err[-2000:]
    assert_nothing_started(tmp_path)


def test_grid_larger_than_max_trials_is_refused(tmp_path, run_cli):
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    status, err = run_cli("run", "spec.yaml", "--max-trials", "1")
    assert status == 2 and "exceed --max-trials 1" in err, err
    assert_nothing_started(tmp_path)


def _given_checkpoint(tmp: Path, arch: str = "convnet", classes: int = 10) -> Path:
    from sophon_ray.run.checkpoint import make_card, save_checkpoint
    from sophon_ray.modes import build_model
    from sophon_ray.spec import DomainSpec, ModelSpec

    spec = ModelSpec(arch, classes)
    card = make_card(spec, DomainSpec("shapes", 12), [DomainSpec("shapes_m", 12)], "x", "protected")
    return save_checkpoint(build_model(spec, 3, 12), card, tmp / "given")


def test_attack_refuses_a_checkpoint_whose_card_does_not_match(tmp_path, run_cli):
    _given_checkpoint(tmp_path, classes=7)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    status, err = run_cli("attack", "spec.yaml", "--checkpoint", "given")
    assert status == 2 and "the card says" in err and "7" in err, err
    assert_nothing_started(tmp_path)


def test_attack_refuses_a_pickle_and_a_corrupt_safetensors(tmp_path, run_cli):
    marker = tmp_path / "unpickled"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "model.pt").write_bytes(pickle.dumps(Evil()))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    status, err = run_cli("attack", "spec.yaml", "--checkpoint", "pickled")
    assert status == 2 and "never loaded" in err, err
    given = _given_checkpoint(tmp_path)
    (given / "model.safetensors").write_bytes(b"\x00" * 64)
    status, err = run_cli("attack", "spec.yaml", "--checkpoint", "given")
    assert status == 2 and "not a readable safetensors" in err, err
    assert not marker.exists()
    assert_nothing_started(tmp_path)


def test_missing_spec_and_bad_override(tmp_path, run_cli):
    status, err = run_cli("run", "nope.yaml")
    assert status == 2 and "spec file not found" in err, err
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(GOOD))
    status, err = run_cli("run", "spec.yaml", "--set", "protect.5.alpha=1")
    assert status == 2 and "cannot set" in err, err
    assert_nothing_started(tmp_path)
