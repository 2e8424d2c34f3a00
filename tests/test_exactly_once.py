"""Exactly once where the other tests do not look (issue 25, deliverable 7): search trials that the ASHA scheduler
stopped (their ``stopped_early`` mark and summary), and a generation trial's sample images whose upload reached the
store but whose answer was lost. Real SQLite MLflow stores in tmp, the real Tracker, Outbox and Tune callback; the
ASHA case runs a real search stage on a local Ray instance. Each replays the journal with its acknowledgements
dropped (a driver killed after delivering, before acknowledging: the worst a replay meets) twice, and nothing in
MLflow changes. The search trial that a SIGKILLed driver left only in the journal is in test_faults_search.py."""

import base64
import io
import json
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest
import yaml
from mlflow import MlflowClient

from sophon_ray import names
from sophon_ray.run.journal import JOURNAL, Journal
from sophon_ray.run.outbox import Outbox
from sophon_ray.run.delivery import HTTP_ENV
from sophon_ray.run.tracking import Tracker

FAST = (0.05, 0.2)  # the outbox's backoff start and cap here


@pytest.fixture(autouse=True)
def _fast_http_failures(monkeypatch):
    for k, v in HTTP_ENV.items():  # what the pipeline sets while the outbox delivers
        monkeypatch.setenv(k, v)


def forget_acks(journal: Path) -> int:
    """Rewrite ``journal`` without its ``ack`` lines, as if the driver had been killed after every delivery and
    before its acknowledgement; returns how many acks were dropped."""
    lines = journal.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = [line for line in lines if '"ack"' not in line or json.loads(line)["op"] != "ack"]
    journal.write_text("".join(kept), encoding="utf-8")
    return len(lines) - len(kept)


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric of a run with every logged (step, value), in order: a point logged twice shows twice."""
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k))
            for k in client.get_run(run_id).data.metrics}


def trial_state(client: MlflowClient, experiment_id: str) -> dict[str, tuple[str, str, dict, dict]]:
    """Per trial key: (run id, status, params, every metric's points) of its attack run; two runs of one key fail."""
    out: dict[str, tuple[str, str, dict, dict]] = {}
    for r in client.search_runs([experiment_id], max_results=1000):
        if r.data.tags.get(names.ROLE) != "attack":
            continue
        key = r.data.tags[names.KEY]
        assert key not in out, f"trial {key} has two runs"
        out[key] = (r.info.run_id, r.info.status, dict(r.data.params), histories(client, r.info.run_id))
    return out


# ------------------------------------------------------------------------------------------ ASHA-stopped trials
ASHA_SAMPLES = 8
ASHA_EPOCHS = 2


@pytest.fixture
def local_ray():
    """A private local Ray instance in this process (2 CPUs, no dashboard), shut down after the test."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def asha_spec(tmp: Path) -> Path:
    """A search of ASHA_SAMPLES recipes against the normal model, ASHA_EPOCHS epochs each, judged by ASHA after 1
    epoch (``grace_period`` 1, ``reduction_factor`` 2: a trial whose best validation score is below the median of those
    that reached the rung before it stops). The learning rate is a choice of one that learns and one that does not.
    The objective counts epoch 0 (before fine-tuning, the same for every trial), so the trials must learn within one
    epoch: with 300 restricted training images none did and ASHA stopped none (seen twice); with spec_for's 600 it
    stopped 4 of 8 (2026-12-06)."""
    from tests.test_faults import spec_for

    spec = spec_for(tmp, "asha", ["direct-all"], ["sgd"])
    data = yaml.safe_load(spec.read_text())
    data["attack"]["subjects"] = ["normal"]
    data["attack"]["search"] = [{"name": "s", "algorithm": "random", "num_samples": ASHA_SAMPLES, "grace_period": 1,
                                 "reduction_factor": 2, "space": {"epochs": [ASHA_EPOCHS], "lr": [1e-5, 0.05]}}]
    spec.write_text(yaml.safe_dump(data))
    return spec


@pytest.mark.integration
def test_asha_stopped_search_trials_have_one_run_one_mark_and_one_summary_also_after_two_replays(tmp_path, local_ray):
    """The real search stage (the pipeline's [3/4], in this process) with ASHA: every trial ASHA stopped has one
    FINISHED run marked ``stopped_early`` = 1 once, with its summary (final, best, best validation and the test score
    there) once at step 0, and the mark is on exactly the trials that ran fewer epochs than their recipe; the
    journal, replayed twice by ``sophon-ray sync`` with its acks dropped, changes nothing in MLflow."""
    from sophon_ray.console.terminal import Console
    from sophon_ray.modes import metric_for
    from sophon_ray.run.context import Outcome, RunContext, RunOptions, View
    from sophon_ray.run.keys import pretrain_key, sweep_id
    from sophon_ray.run.search_stage import search_stage
    from sophon_ray.run.sync import sync
    from sophon_ray.run.train_driver import jobs_dir
    from sophon_ray.run.validate import load_spec
    from tests.test_faults import seed_models

    path = asha_spec(tmp_path)
    store = seed_models(path)  # the normal model, trained here, stored where the pipeline keeps it
    spec = load_spec(str(path))
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", spec.name)
    sid = sweep_id(spec)
    shown = io.StringIO()
    ctx = RunContext(spec, sid, tracker, tracker.sweep_run(sid, f"sweep-{sid}"), spec.out, RunOptions(),
                     View(Console(shown)), Outcome(sid, 0))
    search_stage(ctx, {"normal": store / jobs_dir("pretrain", "normal", pretrain_key(spec))})
    assert ctx.outcome.pending == 0, shown.getvalue()

    m, client = metric_for(spec.mode), MlflowClient(tracking_uri=tracker.uri)
    first = trial_state(client, tracker.experiment_id)
    searched = {k: v for k, v in first.items() if v[2].get(names.GRID) == names.SEARCH_GRID}
    assert len(searched) == ASHA_SAMPLES and {v[1] for v in searched.values()} == {"FINISHED"}, searched
    ran = {k: max(step for step, _ in v[3][m.restricted]) for k, v in searched.items()}  # the last epoch logged
    stopped = {k for k, v in searched.items() if names.STOPPED in v[3]}
    assert stopped, f"ASHA stopped no trial (epochs run: {ran}): the test did not test it"
    assert stopped == {k for k, epochs in ran.items() if epochs < int(searched[k][2]["epochs"])}, ran
    for key in stopped:
        points = searched[key][3]
        assert points[names.STOPPED] == [(0, 1.0)], (key, points)
        for summary in (m.final, m.best, m.val_best, m.at_val_best):
            assert [step for step, _ in points[summary]] == [0], (key, summary, points)
        steps = [step for step, _ in points[m.restricted]]
        assert steps == list(range(len(steps))), (key, steps)  # each epoch it ran, once
        assert points[m.final] == [(0, points[m.restricted][-1][1])]  # its final score: its last epoch's

    journal = spec.out / JOURNAL
    assert Journal(journal).pending() == []
    for _ in range(2):
        assert forget_acks(journal) >= len(searched)
        result = sync(spec)
        assert result.trials >= len(searched) and result.pending == 0, result
        assert trial_state(client, tracker.experiment_id) == first  # no run, mark, summary or epoch twice


# ------------------------------------------------------------------------------- generation's sample images
def png(seed: int) -> bytes:
    """A sample grid as generation's trials send it (``samples/*.png``, the mode's own PNG writer)."""
    import torch

    from sophon_ray.modes.generation.task import _png

    return _png(torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(seed)) * 2 - 1)


class LostArtifactAnswer:
    """``MlflowClient.log_artifact`` of a real client that stores the file and then, on the ``lose``-th call,
    raises ConnectionError (the upload reached the store, its answer was lost); counts the calls per file name."""

    def __init__(self, client: MlflowClient, lose: int) -> None:
        self.real, self.lose, self.calls, self.count = client.log_artifact, lose, [], 0
        client.log_artifact = self

    def __call__(self, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
        self.real(run_id, local_path, artifact_path)
        self.calls.append(f"{artifact_path}/{Path(local_path).name}")
        self.count += 1
        if self.count == self.lose:
            raise ConnectionError(f"log_artifact #{self.lose}: stored, answer lost")


def files_on_disk(client: MlflowClient, run_id: str) -> dict[str, bytes]:
    """Every file under the run's artifact folder (a SQLite store's artifacts are local), by relative path."""
    root = Path(unquote(urlparse(client.get_run(run_id).info.artifact_uri).path))
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("lose", [1, 2], ids=["before.png-answer-lost", "after.png-answer-lost"])
def test_sample_images_resent_after_a_lost_answer_are_stored_once_with_their_bytes_also_after_two_replays(tmp_path,
                                                                                                           lose):
    """A generation trial through the real Tune callback (Tune's own Trial object, no cluster) into the real
    outbox: its sample grids come with its last result; the ``lose``-th upload reaches the store and its answer is
    lost, so the trial's operations are delivered again. The run holds each image once, with its bytes, its epochs
    and summary once; replaying the journal (acks dropped) twice re-sends each image once per replay, as a
    replacement: still one file per name, the same bytes."""
    from ray.tune.experiment import Trial as TuneTrial

    from sophon_ray.modes import metric_for
    from sophon_ray.run.plan import plan_trials
    from sophon_ray.run.tune_driver import LAST_REPORT, make_callback
    from sophon_ray.run.validate import parse_spec

    spec = parse_spec({"mode": "generation", "model": {"arch": "unet-tiny"}, "protect": [],
                       "attack": {"subjects": ["normal"], "evaluation": {"strategy": ["direct-all"],
                                                                         "optimizer": ["adam"]}}})
    m, planned = metric_for(spec.mode), plan_trials(spec, [])[0]
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "gen")
    parent = tracker.sweep_run("sweep1", "sweep", mode=spec.mode)
    lost = LostArtifactAnswer(tracker.client, lose)
    images = {"samples/before.png": png(0), "samples/after.png": png(1)}
    curve = [{"epoch": e, m.restricted: 10.0 * e, m.restricted_loss: 1.0 - e / 10} for e in range(3)]
    trial = TuneTrial("attack_trial", config={"key": planned.key}, stub=True)

    class Mail:  # the trial mail's reader: the curve and the sample grids arrive with the last result
        boxes = {trial.trial_id: (curve, images)}

        def take(self, box):
            return self.boxes.pop(box, ([], {}))

    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST, writers=1)
    callback = make_callback(tracker, parent, "sweep1", outbox, metric=m)
    callback.attach(Mail(), {planned.key: planned})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {LAST_REPORT: True, m.final: 20.0, m.best: 20.0, m.original: 80.0,
                                            "sample_kid": 0.5, "node_id": "n1"})
    callback.on_trial_complete(0, [], trial)
    outbox.start()   # the whole trial in one round: the lost answer sends its operations again
    assert outbox.drain(30)
    outbox.close()
    assert outbox.stats.failures == 1, outbox.stats
    # up to the lost answer, then the trial's operations again from its open: every image of it resent
    assert lost.calls == [*list(images)[:lose], *images], lost.calls

    client = MlflowClient(tracking_uri=tracker.uri)

    def assert_stored_once() -> dict:
        state = trial_state(client, tracker.experiment_id)
        assert list(state) == [planned.key]
        run_id, status, _, points = state[planned.key]
        assert status == "FINISHED"
        assert points[m.restricted] == [(e, 10.0 * e) for e in range(3)] and points[m.final] == [(0, 20.0)]
        assert {a.path for a in client.list_artifacts(run_id, "samples")} == set(images)
        assert files_on_disk(client, run_id) == images  # one file per name, no leftover, the bytes sent
        return state

    stored = assert_stored_once()
    journaled = [r for r in Journal(tmp_path / JOURNAL).records() if r["op"] == "artifact"]
    assert {r["name"]: base64.b64decode(r["base64"]) for r in journaled} == images
    for _ in range(2):
        lost.calls.clear()
        assert forget_acks(tmp_path / JOURNAL) >= 1
        replay = Outbox(tracker, tmp_path / JOURNAL, delays=FAST, writers=1)
        assert replay.load_journal() == 1
        replay.start()
        assert replay.drain(30)
        replay.close()
        assert replay.stats.failures == 0 and sorted(lost.calls) == sorted(images), lost.calls
        assert assert_stored_once() == stored


# ------------------------------------------------------------------------------- a journal torn by a kill
def test_after_a_driver_killed_mid_append_the_next_runs_first_operation_is_kept_and_delivered(tmp_path):
    """A SIGKILL can cut the journal's last line short. The resumed driver's outbox appends after it: its first
    line must not join the fragment (the two would be skipped as one line that is not JSON, and that trial's later
    operations dropped on replay as belonging to a run never opened). A replay delivers the new trial once."""
    from sophon_ray.run.journal import Op

    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "torn")
    parent = tracker.sweep_run("sweep1", "sweep")
    path = tmp_path / JOURNAL
    killed = Journal(path)
    killed.append([Op("k1", "open", {"parent": parent, "sweep": "sweep1", "name": "k1", "params": {}}).line()])
    killed.close()
    with path.open("a", encoding="utf-8") as f:
        f.write('{"key":"k1","op":"ro')  # the driver was killed mid-write
    resumed = Outbox(tracker, path, delays=FAST)   # the next run enqueues a trial: open, rows, finish
    resumed.open("k2", parent, "sweep1", "k2", {"lr": 0.01})
    resumed.rows("k2", [(0, {names.RESTRICTED_ACC: 50.0})])
    resumed.finish("k2", "FINISHED")
    resumed.close()   # never started: the store got nothing, the journal has it all
    assert [(op.key, op.kind) for op in Journal(path).pending()] == [("k1", "open"), ("k2", "open"), ("k2", "rows"),
                                                                     ("k2", "finish")]
    replay = Outbox(tracker, path, delays=FAST)
    assert replay.load_journal() == 2
    replay.start()
    assert replay.drain(30)
    replay.close()
    state = trial_state(MlflowClient(tracking_uri=tracker.uri), tracker.experiment_id)
    assert state["k2"][1:] == ("FINISHED", {"lr": "0.01"}, {names.RESTRICTED_ACC: [(0, 50.0)]})
