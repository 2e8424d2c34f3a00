"""attack.pack, the planning and mapping side: which grid trials form packs, the auto size, validation, the dry
run, and how a packed Tune trial maps to its members' MLflow runs (no Ray: Tune's stub trials, a fake mail)."""

import math
from dataclasses import replace
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sophon_ray import names
from sophon_ray.core.packed import Footprint, footprint
from sophon_ray.modes import build_model
from sophon_ray.run.packing import (CPU_PACK_BYTES, CPU_PACK_CAP, CPU_PACK_FLOOR, CPU_PACK_LIMIT_BYTES, GPU_PACK_CAP,
                                    balanced_chunks, cpu_pack_size, largest_first, pack_id, pack_lines, pack_size,
                                    plan_for, plan_packs)
from sophon_ray.run.plan import plan_trials
from sophon_ray.run.texts import dry_run_text
from sophon_ray.run.validate import load_spec, parse_spec
from sophon_ray.spec import SpecError
from sophon_ray.run.keys import sweep_id

REPO = Path(__file__).resolve().parent.parent
# 2 lrs x 2 seeds x 2 strategies per subject: the lrs and seeds pack, the strategies do not
GRID = {"strategy": ["direct-all", "initfc-fc"], "optimizer": ["sgd"], "lr": [1e-3, 1e-2], "seed": [0, 1],
        "epochs": [1]}


def spec_with(pack=1, subjects=("normal", "scratch"), **attack):
    return parse_spec({"attack": {"subjects": list(subjects), "evaluation": GRID, "pack": pack, **attack}})


def test_pack_is_not_hashed_and_defaults_to_one():
    assert spec_with().attack.pack == 1
    assert sweep_id(spec_with(4)) == sweep_id(spec_with(1)) == sweep_id(spec_with("auto"))
    assert [t.key for t in plan_trials(spec_with(4), [])] == [t.key for t in plan_trials(spec_with(), [])]


@pytest.mark.parametrize("bad, fix", [(0, "or 'auto'"), (-2, "or 'auto'"), ("eight", "e.g. `pack: 8`"),
                                      (2.5, "an integer or a string"), (True, "an integer or a string")])
def test_a_bad_pack_is_refused_naming_the_field_and_the_fix(bad, fix):
    with pytest.raises(SpecError) as err:
        spec_with(bad)
    assert "attack.pack" in str(err.value) and fix in str(err.value)


def test_packs_group_one_subject_grid_domain_and_pack_key_in_chunks_of_at_most_pack():
    spec = spec_with(3)
    trials = plan_trials(spec, [])
    plan = plan_packs(trials, 3)
    by_key = {t.key: t for t in trials}
    members = [[by_key[k] for k in keys] for keys in plan.packs.values()]
    assert all(2 <= len(m) <= 3 for m in members)
    for m in members:
        assert len({(t.subject, t.grid, t.domain, t.config.strategy, t.config.optimizer) for t in m}) == 1
        if m[0].subject.kind == "scratch":       # a scratch model is seeded by its trial: one seed per pack
            assert len({t.config.seed for t in m}) == 1
    packed = [k for keys in plan.packs.values() for k in keys]
    assert sorted(packed + [t.key for t, _ in plan.alone]) == sorted(by_key)   # every trial once
    assert len(set(packed)) == len(packed)
    # normal: 2 strategies x 4 (lr, seed) -> two packs of 2 each (not 3 and a lone trial); scratch: 2 seeds x 2 lrs
    assert [len(m) for m in members] == [2] * 6 and plan.alone == []
    assert set(plan.units) == set(plan.packs) | {t.key for t, _ in plan.alone}


def test_groups_split_evenly_and_the_largest_packs_run_first():
    """No trial is left alone when its group is a little larger than the pack, and Tune gets the largest packs first:
    the quickstart's 162 trials are 24 packs of 6 (protected, normal), then 6 scratch packs of 3."""
    assert [len(c) for c in balanced_chunks(list(range(9)), 8)] == [5, 4]
    assert [len(c) for c in balanced_chunks(list(range(13)), 6)] == [5, 4, 4]
    assert [len(c) for c in balanced_chunks(list(range(6)), 8)] == [6] and balanced_chunks([], 8) == []
    assert sum(balanced_chunks(list(range(13)), 6), []) == list(range(13))
    spec = load_spec(REPO / "sweeps" / "quickstart.yaml", ["attack.pack=auto"])
    plan = plan_for(spec, plan_trials(spec, [("ice-sampled", 0)]))
    assert [len(m) for m in plan.packs.values()] == [6] * 24 + [3] * 6 and plan.alone == []
    assert list(largest_first({"a": ("1", "2"), "b": ("1", "2", "3"), "c": ("4", "5")})) == ["b", "a", "c"]


def test_pack_one_is_todays_plan_and_the_pack_id_is_stable():
    trials = plan_trials(spec_with(), [])
    plan = plan_for(spec_with(), trials)
    assert plan.packs == {} and plan.units == [t.key for t in trials]
    assert pack_id(["a", "b"]) == pack_id(["a", "b"]) != pack_id(["b", "a"])


def test_trials_that_cannot_pack_run_alone_with_the_reason():
    trials = plan_trials(spec_with(4), [])
    adapting = [replace(t, config=replace(t.config, adapt="entropy")) for t in trials[:3]]
    plan = plan_packs(adapting + trials[3:], 4)
    assert {t.key for t, _ in plan.alone} >= {t.key for t in adapting}
    assert all(why.startswith("adapt: entropy") for t, why in plan.alone if t in adapting)
    assert all(why.startswith("model: ") for _, why in plan_packs(trials, 4, model_problem="x: Dropout").alone)
    generation = plan_packs(trials, 4, mode="generation")
    assert not generation.packs and all("classification-only" in why for _, why in generation.alone)


def test_the_footprint_is_the_models_parameters_and_its_activations_per_sample():
    """The quickstart's convnet at 16 px: its first convolution's 16 x 16 x 16 output is the widest activation."""
    spec = load_spec(REPO / "sweeps" / "quickstart.yaml")
    model = build_model(spec.model, 3, 16).train()
    found = footprint(model, 3, 16)
    assert found.parameters == sum(p.numel() for p in model.parameters()) and found.widest == 16 * 16 * 16
    assert found.activations > 3 * found.widest and model.training            # left in the mode it was in
    assert footprint(model, 3, 32).widest == 4 * found.widest                  # 4x the pixels


def test_auto_on_the_cpu_keeps_the_packs_widest_activation_within_the_budget():
    convnet_16px = 16 * 16 * 16
    assert [cpu_pack_size(b, convnet_16px) for b in (16, 32, 64, 128, 256, 512)] == [16, 8, 4, 4, 4, 2]
    assert cpu_pack_size(32, convnet_16px // 4) == CPU_PACK_CAP == 32             # 8 px: capped
    assert cpu_pack_size(4096, convnet_16px) == 1                                 # one member is past the limit
    for batch, widest in [(32, 4096), (100, 1000), (7, 333), (1, 1), (300, 4096), (128, 16384), (2048, 4096)]:
        n, per_member = cpu_pack_size(batch, widest), batch * widest * 4
        fits = n * per_member <= CPU_PACK_BYTES < (n + 1) * per_member          # the budget's largest pack
        floored = n == CPU_PACK_FLOOR and n * per_member <= CPU_PACK_LIMIT_BYTES
        limited = n < CPU_PACK_FLOOR and n * per_member <= CPU_PACK_LIMIT_BYTES < (n + 1) * per_member
        assert n == CPU_PACK_CAP or fits or floored or limited or n == 1, (batch, widest, n)
    model = Footprint(parameters=28_506, widest=convnet_16px, activations=23_306)
    assert pack_size(spec_with("auto"), 32, model) == 8 and pack_size(spec_with(5), 128) == 5
    with pytest.raises(ValueError, match="footprint"):
        pack_size(spec_with("auto"), 32)


def test_auto_on_the_cpu_leaves_a_model_only_vmap_packs_alone_and_a_number_packs_it():
    """resnet18's residual blocks have no grouped form; its vmap packs ran 0.56-0.73x lone trials on this CPU."""
    def resnet_with(pack):
        return parse_spec({"model": {"arch": "resnet18", "num_classes": 10},
                           "attack": {"subjects": ["normal"], "evaluation": GRID, "pack": pack}})

    resnet = resnet_with("auto")
    found = footprint(build_model(resnet.model, 3, 16), 3, 16)
    assert found.vmap_only is not None and "Sequential" in found.vmap_only
    assert pack_size(resnet, 32, found) == 1
    plan = plan_for(resnet, plan_trials(resnet, []))
    assert not plan.packs and all("grouped formulation" in why for _, why in plan.alone)
    numbered = resnet_with(4)
    assert plan_for(numbered, plan_trials(numbered, [])).packs
    assert footprint(build_model(spec_with().model, 3, 16), 3, 16).vmap_only is None        # the convnet groups


def test_auto_on_a_gpu_fits_parameters_and_the_batchs_activations_in_the_memory():
    gpu = parse_spec({"attack": {"pack": "auto"}, "resources": {"gpus_per_trial": 1.0}})
    small, big = Footprint(10**6, 4096, 20_000), Footprint(2 * 10**9, 4096, 20_000)
    memory = 80 * 2**30
    assert pack_size(gpu, 32, small, gpu_bytes=memory) == GPU_PACK_CAP          # small model: capped
    assert pack_size(gpu, 32, big, gpu_bytes=memory) == 1                        # big model: alone
    n = pack_size(gpu, 32, Footprint(10**8, 4096, 20_000), gpu_bytes=memory)
    assert 1 < n < GPU_PACK_CAP
    wide = Footprint(10**8, 10**6, 10**7)                                        # same parameters, huge activations
    assert pack_size(gpu, 32, wide, gpu_bytes=memory) < n and pack_size(gpu, 1, wide, gpu_bytes=memory) > 1
    quarter = parse_spec({"attack": {"pack": "auto"}, "resources": {"gpus_per_trial": 0.25}})
    assert pack_size(quarter, 32, Footprint(10**8, 4096, 20_000), gpu_bytes=memory) == n // 4


def test_auto_sizes_each_batch_sizes_packs_and_the_dry_run_says_the_sizes():
    """At 16 px a batch of 32 packs 8 members, a batch of 128 4, a batch of 4096 none (one member's widest activation
    is past the limit): those trials run alone, and the dry run says why."""
    spec = spec_with("auto", subjects=("normal",), evaluation={**GRID, "strategy": ["direct-all"],
                                                               "lr": [1e-3, 1e-2, 1e-1], "seed": [0, 1, 2],
                                                               "batch_size": [32, 128, 4096]})
    spec = replace(spec, original=replace(spec.original, image_size=16))
    plan = plan_for(spec, plan_trials(spec, []))
    assert plan.sizes == {32: 8, 128: 4, 4096: 1}
    assert sorted(len(m) for m in plan.packs.values()) == [3, 3, 3, 4, 5]    # 9 trials: 5 + 4 at 32, 3 x 3 at 128
    assert len(plan.alone) == 9 and all("auto packs nothing at batch 4096" in why for _, why in plan.alone)
    text = dry_run_text(spec, plan_trials(spec, []))
    assert ("packing (attack.pack: auto: 8 at batch 32, 4 at batch 128, 1 at batch 4096): 18 trials in 5 packs"
            in text), text
    assert "9 alone: attack.pack: auto packs nothing at batch 4096" in text, text


def test_the_dry_run_says_how_many_packs_and_why_trials_run_alone():
    spec = spec_with(3, evaluation=[GRID, {**GRID, "strategy": ["direct-all"], "adapt": ["entropy"]}])
    text = dry_run_text(spec, plan_trials(spec, []))
    # normal: 2 strategies x 4 -> (2 + 2) each; scratch: 2 seeds x 2 lrs -> 2 packs; the 8 adapt trials alone
    assert "packing (attack.pack: 3): 12 trials in 6 packs (Tune trials), 8 trials alone" in text, text
    assert "    8 alone: adapt: entropy is a label-free adaptation phase" in text, text
    assert "no other trial" not in text, text
    assert "packing" not in dry_run_text(spec_with(), plan_trials(spec_with(), []))
    assert pack_lines(spec_with(), plan_for(spec_with(), [])) == []


def test_a_packed_tune_trial_logs_every_member_to_its_own_run_once(tmp_path):
    """The real callback with Tune's stub trials: one pack trial of four members, each member's rows from its own
    mail box and its summary from the result's members; an errored pack fails the members without a summary."""
    from ray.tune.experiment import Trial as TuneTrial

    from sophon_ray.run.outbox import Outbox
    from sophon_ray.run.tune_driver import LAST_REPORT, MEMBERS, make_callback, mail_box
    from tests.test_outbox import FAST, tracker_and_parent

    tracker, parent = tracker_and_parent(tmp_path)
    planned = [t for t in plan_trials(spec_with(3), []) if t.subject.kind == "normal"]
    plan = plan_packs(planned, 4)
    (first, members), (second, other) = list(plan.packs.items())
    table = {t.key: t for t in planned}
    ok, bad = (TuneTrial("attack_trial", config={"key": k}, stub=True) for k in (first, second))

    class Mail:
        boxes = {mail_box(ok.trial_id, k): ([{"epoch": 0, names.RESTRICTED_ACC: 10.0 + i},
                                              {"epoch": 1, names.RESTRICTED_ACC: 20.0 + i}], {"curve.txt": b"x"})
                 for i, k in enumerate(members)}

        def take(self, box):
            return self.boxes.pop(box, ([], {}))

    outbox = Outbox(tracker, None, delays=FAST).start()
    callback = make_callback(tracker, parent, "sweep1", outbox)
    callback.attach(Mail(), table, plan.packs)
    callback.on_trial_start(0, [], ok)
    summary = {k: {LAST_REPORT: True, names.FINAL: 20.0 + i, names.BEST: 20.0 + i, names.ORIGINAL_ACC: 90.0,
                   "node_id": "n1"} for i, k in enumerate(members)}
    callback.on_trial_result(0, [], ok, {MEMBERS: summary, LAST_REPORT: True})
    callback.on_trial_result(0, [], ok, {MEMBERS: summary, LAST_REPORT: True})   # a replayed result: no duplicate
    callback.on_trial_complete(0, [], ok)
    callback.on_trial_start(0, [], bad)
    callback.on_trial_result(0, [], bad, {MEMBERS: {other[0]: summary[members[0]]}, LAST_REPORT: False})
    callback.on_trial_error(0, [], bad)
    assert outbox.drain(30)
    outbox.close()
    client = MlflowClient(tracking_uri=tracker.uri)
    runs = {r.data.tags[names.KEY]: r for r in client.search_runs([tracker.experiment_id])
            if r.data.tags.get(names.ROLE) == "attack"}
    assert set(runs) == set(members) | set(other)
    for i, k in enumerate(members):
        run = runs[k]
        assert run.info.status == "FINISHED" and run.info.run_name == table[k].name
        assert run.data.params == {p: str(v) for p, v in table[k].params().items()}
        history = client.get_metric_history(run.info.run_id, names.RESTRICTED_ACC)
        assert sorted((m.step, m.value) for m in history) == [(0, 10.0 + i), (1, 20.0 + i)]
        assert run.data.metrics[names.FINAL] == 20.0 + i and run.data.tags[names.NODE] == "n1"
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["curve.txt"]
    assert {k: runs[k].info.status for k in other} == {other[0]: "FINISHED", **{k: "FAILED" for k in other[1:]}}


def test_the_pack_reporter_reports_what_each_member_alone_would(monkeypatch):
    """Each member's EpochReporter gets its own rows and summary; one Tune report carries all of them."""
    import sophon_ray.run.trials_worker as worker

    sent: dict[str, list] = {}
    monkeypatch.setattr(worker, "mail_sender", lambda mail, key="": lambda rows, files: sent.setdefault(key, []).append(
        (list(rows), dict(files))))
    reports: list[dict] = []
    members = [t for t in plan_trials(spec_with(2), []) if t.subject.kind == "normal"][:2]
    reporter = worker.PackReporter(members, reports.append, names.ACCURACY, mail=object(), every_s=0.0)
    for epoch in (0, 1):
        for i in (0, 1):
            reporter(i, epoch, {names.RESTRICTED_ACC: 10.0 * (epoch + 1) + i, names.RESTRICTED_LOSS: 1.0})
    assert len(reports) == 1 and not reports[0][worker.LAST_REPORT]   # after epoch 0 only (not the final epoch)
    for i, t in enumerate(members):
        reporter.members[i].flush({"f.txt": b"1"}, **{names.FINAL: 20.0 + i, worker.LAST_REPORT: True})
    reporter.send()
    last = reports[-1]
    assert last[worker.LAST_REPORT] and set(last[worker.MEMBERS]) == {t.key for t in members}
    for i, t in enumerate(members):
        assert last[worker.MEMBERS][t.key][names.FINAL] == 20.0 + i
        assert last[worker.MEMBERS][t.key][names.BEST] == 20.0 + i
        rows = [r for batch, _ in sent[t.key] for r in batch]
        assert [r["epoch"] for r in rows] == [0, 1] and rows[1][names.RESTRICTED_ACC] == 20.0 + i
    assert math.isinf(reporter.members[0].every_s)
