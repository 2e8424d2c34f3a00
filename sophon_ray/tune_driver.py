"""Ray Tune: the attack grid as one trial per (subject, variant, strategy, optimizer, lr, batch size,
data fraction, schedule, epochs, seed), logged to MLflow by a driver-side callback (one writer)."""

from __future__ import annotations

import itertools
import logging
from dataclasses import fields
from typing import Any

import torch

from sophon_ray.attack import SCRATCH_STRATEGY, AttackConfig, grid_configs
from sophon_ray.spec import SweepSpec, spec_hash

log = logging.getLogger(__name__)
ATTACK_FIELDS = [f.name for f in fields(AttackConfig)]


def plan_trials(spec: SweepSpec, protected: list[str]) -> list[dict[str, Any]]:
    """Every attack trial of the sweep as a plain dict (deterministic order and keys).

    ``protected`` lists the protected models' labels. The scratch baseline runs once per
    (optimizer, lr, batch size, data fraction, schedule, epochs, seed), with strategy ``direct-all``:
    a random init trains all its layers whatever the cell's strategy (see README, Metrics).
    """
    models = [("protected", label) for label in protected if "protected" in spec.attack.subjects]
    models += [("normal", "-")] if "normal" in spec.attack.subjects else []
    trials, seen = [], set()
    configs = grid_configs(spec.attack.grid, spec.attack.weight_decay)
    for d, config in itertools.product(range(len(spec.restricted)), configs):
        cells = [(subject, variant, config) for subject, variant in models]
        scratch = AttackConfig(**{**config.as_params(), "strategy": SCRATCH_STRATEGY})
        if "scratch" in spec.attack.subjects and (d, scratch) not in seen:
            seen.add((d, scratch))
            cells.append(("scratch", "-", scratch))
        for subject, variant, cfg in cells:
            trial = {"subject": subject, "variant": variant, **cfg.as_params()}
            if len(spec.restricted) > 1:  # one more grid axis; single-domain keys stay as they were
                trial["domain"] = f"{d}:{spec.restricted[d].dataset}"
            trial["key"] = spec_hash(trial)
            trial["name"] = trial_name(trial)
            trials.append(trial)
    return trials


def trial_name(trial: dict[str, Any]) -> str:
    who = trial["subject"] if trial["variant"] == "-" else f"{trial['subject']}/{trial['variant']}"
    what = "all" if trial["subject"] == "scratch" else trial["strategy"]
    where = f"{trial['domain']}/" if "domain" in trial else ""
    return (f"{where}{who}/{what}/{trial['optimizer']}/lr{trial['lr']:g}/bs{trial['batch_size']}/"
            f"f{trial['data_fraction']:g}/e{trial['epochs']}/{trial['schedule']}/s{trial['seed']}")


def model_for(trial: dict[str, Any]) -> str:
    return f"protected/{trial['variant']}" if trial["subject"] == "protected" else "normal"


def attack_trial(config: dict[str, Any], models: dict[str, tuple[dict, dict]], splits: Any, threads: int) -> None:
    """The Tune function trainable: build the subject, fine-tune it, report every epoch."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415

    from sophon_ray.attack import finetune, scratch_model  # noqa: PLC0415
    from sophon_ray.models import build_model  # noqa: PLC0415
    from sophon_ray.spec import ModelSpec  # noqa: PLC0415

    torch.set_num_threads(max(1, threads))
    device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"  # GPUs Tune gave this trial
    trial = config["trial"]
    state, card = models[model_for(trial)]
    model = build_model(ModelSpec(card["arch"], card["num_classes"]), card["channels"], card["image_size"])
    model.load_state_dict(state)
    if trial["subject"] == "scratch":
        model = scratch_model(model, trial["seed"])
    cfg = AttackConfig(**{k: trial[k] for k in ATTACK_FIELDS})
    report = lambda epoch, m: tune.report({"epoch": epoch, **m}) if epoch < cfg.epochs else None  # noqa: E731
    domain = int(trial.get("domain", "0").split(":")[0])
    result = finetune(model, splits.restricted_full[domain], splits.restricted_test[domain], cfg,
                      original_test=splits.original_test, device=device, on_epoch=report)
    tune.report({"epoch": cfg.epochs, "node_id": ray.get_runtime_context().get_node_id(),
                 "restricted_acc": result.final, "restricted_loss": result.restricted_loss[-1],
                 "restricted_acc_final": result.final, "restricted_acc_best": result.best,
                 "original_acc": result.original_acc, "train_size": result.train_size,
                 "compute_seconds": result.seconds, "done": True})


def make_callback(tracker: Any, parent_id: str, sweep_id: str) -> Any:
    """A Tune callback that mirrors every trial into its own MLflow child run, exactly once per step."""
    from ray import tune  # noqa: PLC0415

    class MlflowTrials(tune.Callback):
        def __init__(self) -> None:
            self.runs: dict[str, str] = {}
            self.steps: dict[str, set[int]] = {}

        def _run(self, trial: Any) -> str:
            if trial.trial_id not in self.runs:
                t = trial.config["trial"]
                params = {k: t[k] for k in ["subject", "variant", "domain", *ATTACK_FIELDS] if k in t}
                run_id = tracker.child_run(parent_id, sweep_id, "attack", t["key"], t["name"], params)
                self.runs[trial.trial_id] = run_id
                self.steps[run_id] = tracker.logged_steps(run_id, "restricted_acc")
            return self.runs[trial.trial_id]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._run(trial)

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            run_id = self._run(trial)
            step = int(result["epoch"])
            if step in self.steps[run_id]:
                return  # a retried trial replays epochs that are already logged
            row = {k: result[k] for k in ("restricted_acc", "restricted_loss") if k in result}
            rows = [(step, row)]
            if result.get("done"):
                rows.append((0, {k: result[k] for k in ("restricted_acc_final", "restricted_acc_best",
                                                        "original_acc") if result.get(k) is not None}))
            tracker.log_rows(run_id, rows)
            if result.get("done"):
                tracker.set_tag(run_id, "sophon.node_id", result.get("node_id", ""))
            self.steps[run_id].add(step)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tracker.finish(self._run(trial), "FINISHED")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            tracker.finish(self._run(trial), "FAILED")

    return MlflowTrials()


def run_attacks(spec: SweepSpec, trials: list[dict[str, Any]], models: dict[str, tuple[dict, dict]], splits: Any,
                storage_path: str, name: str, callbacks: list[Any], max_failures: int = 2) -> Any:
    """Run ``trials`` as one Tune experiment; returns Tune's ResultGrid."""
    from ray import tune  # noqa: PLC0415

    r = spec.resources
    trainable = tune.with_resources(
        tune.with_parameters(attack_trial, models=models, splits=splits, threads=int(max(1, r.cpus_per_trial))),
        {"cpu": r.cpus_per_trial, "gpu": r.gpus_per_trial},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search(trials)},
        tune_config=tune.TuneConfig(reuse_actors=True, trial_dirname_creator=lambda t: f"t-{t.trial_id}"),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks, verbose=1,
                                  failure_config=tune.FailureConfig(max_failures=max_failures)),
    )
    return tuner.fit()
