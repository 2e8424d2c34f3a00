"""The MLflow outbox without Ray: a real SQLite store, and a store that is really down (an HTTP URI on a closed
port: connection refused), never mocks. Exactly once means: one run per trial key, each metric step once."""

import os
import pickle
import socket
import threading
import time
from collections import Counter

import pytest
from mlflow import MlflowClient

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from sophon_ray import names  # noqa: E402
from sophon_ray.run.delivery import (DEFAULT_FSYNC_S, FSYNC_ENV, HTTP_ENV, SERVER_WRITERS, SQLITE_WRITERS,  # noqa: E402
                                     WAIT_ENV, WRITERS_ENV, backoff, fsync_seconds, wait_seconds, writers_for)
from sophon_ray.run.outbox import JOURNAL, Journal, Op, Outbox  # noqa: E402
from sophon_ray.run.tracking import Tracker, TrackingError  # noqa: E402

EPOCHS = 3
FAST = (0.05, 0.2)  # backoff start and cap for the tests


@pytest.fixture(autouse=True)
def _fast_http_failures(monkeypatch):
    for k, v in HTTP_ENV.items():  # what the pipeline sets while the outbox delivers
        monkeypatch.setenv(k, v)


def closed_port_uri() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"  # nothing listens once the socket is closed


def tracker_and_parent(tmp_path) -> tuple[Tracker, str]:
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "outbox")
    return tracker, tracker.sweep_run("sweep1", "sweep-sweep1")


def trial_ops(outbox: Outbox, parent: str, key: str) -> None:
    """What the Tune callback enqueues for one trial: open, two reports (epochs 0-1, then 2-3 + final), a tag,
    the finish; the second report repeats epoch 1 (a retried trial replays its epochs)."""
    outbox.open(key, parent, "sweep1", f"name-{key}", {"lr": 0.01, "optimizer": "adam"})
    outbox.rows(key, [(e, {names.RESTRICTED_ACC: 10.0 + e, names.RESTRICTED_LOSS: 2.0 - e / 10}) for e in (0, 1)])
    outbox.rows(key, [(e, {names.RESTRICTED_ACC: 10.0 + e, names.RESTRICTED_LOSS: 2.0 - e / 10}) for e in (1, 2, 3)]
                + [(0, {names.FINAL: 13.0, names.BEST: 13.0, names.ORIGINAL_ACC: 90.0})])
    outbox.tag(key, names.NODE, "node-a")
    outbox.finish(key, "FINISHED")


def assert_exactly_once(tracker: Tracker, keys: list[str]) -> None:
    client = MlflowClient(tracking_uri=tracker.uri)
    runs = [r for r in client.search_runs([tracker.experiment_id], max_results=1000)
            if r.data.tags.get(names.ROLE) == "attack"]
    assert sorted(r.data.tags[names.KEY] for r in runs) == sorted(keys)
    for r in runs:
        assert r.info.status == "FINISHED" and r.data.tags[names.NODE] == "node-a"
        assert r.data.params == {"lr": "0.01", "optimizer": "adam"}
        for metric in (names.RESTRICTED_ACC, names.RESTRICTED_LOSS):
            steps = sorted(m.step for m in client.get_metric_history(r.info.run_id, metric))
            assert steps == list(range(EPOCHS + 1)), (r.data.tags[names.KEY], metric, steps)
        for metric in (names.FINAL, names.BEST, names.ORIGINAL_ACC):
            assert len(client.get_metric_history(r.info.run_id, metric)) == 1, metric


def test_backoff_doubles_up_to_its_cap():
    delays = backoff(0.5, 4.0)
    assert [next(delays) for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_wait_seconds_reads_its_variable_and_names_it_when_bad(monkeypatch):
    monkeypatch.setenv(WAIT_ENV, "7.5")
    assert wait_seconds() == 7.5
    monkeypatch.setenv(WAIT_ENV, "soon")
    with pytest.raises(TrackingError, match=WAIT_ENV):  # a user error: exit 2 and the message, no traceback
        wait_seconds()


def test_operations_are_delivered_in_order_exactly_once_and_acknowledged(tmp_path):
    tracker, parent = tracker_and_parent(tmp_path)
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST).start()
    for key in ("k1", "k2", "k3"):
        trial_ops(outbox, parent, key)
    assert outbox.drain(30)
    outbox.close()
    assert outbox.completed == {"k1", "k2", "k3"} and outbox.stats.failures == 0
    assert_exactly_once(tracker, ["k1", "k2", "k3"])
    assert Journal(tmp_path / JOURNAL).pending() == []  # every trial acknowledged


def test_a_replay_of_writes_whose_ack_was_lost_leaves_the_runs_as_they_were_end_times_included(tmp_path):
    """A driver killed after the store took a trial's writes but before their ack: the next run replays them; the
    run keeps its run id, metrics, status and end time (the finish carries the time it was journaled)."""
    tracker, parent = tracker_and_parent(tmp_path)
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST).start()
    for key in ("k1", "k2"):
        trial_ops(outbox, parent, key)
    assert outbox.drain(30)
    outbox.close()
    client = MlflowClient(tracking_uri=tracker.uri)

    def state() -> dict:
        runs = [r for r in client.search_runs([tracker.experiment_id]) if r.data.tags.get(names.ROLE) == "attack"]
        return {r.data.tags[names.KEY]: (r.info.run_id, r.info.status, r.info.end_time, r.data.metrics) for r in runs}

    before = state()
    path = tmp_path / JOURNAL
    path.write_text("".join(line for line in path.read_text().splitlines(keepends=True) if '"ack"' not in line))
    time.sleep(0.05)  # a re-stamped end time would differ
    replay = Outbox(tracker, path, delays=FAST)
    assert replay.load_journal() == 2
    replay.start()
    assert replay.drain(30)
    replay.close()
    assert state() == before
    assert_exactly_once(tracker, ["k1", "k2"])


def test_a_down_store_never_blocks_the_caller_and_the_journal_keeps_everything_for_a_later_sync(tmp_path):
    tracker, parent = tracker_and_parent(tmp_path)
    live = tracker.client
    tracker.client = MlflowClient(tracking_uri=closed_port_uri())  # the server is down: connection refused
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST).start()
    started = time.perf_counter()
    for key in ("k1", "k2"):
        trial_ops(outbox, parent, key)
    assert time.perf_counter() - started < 0.5, "enqueueing waited for the store"
    assert not outbox.drain(1.0)
    outbox.close()
    assert outbox.stats.failures >= 2 and outbox.pending_keys() == {"k1", "k2"}
    assert outbox.completed == {"k1", "k2"}  # finished trials are known as finished, so --resume reruns neither
    pending = Journal(tmp_path / JOURNAL).pending()
    assert [op.kind for op in pending if op.key == "k1"] == ["open", "rows", "rows", "tag", "finish"]

    tracker.client = live  # the store is back: a sync delivers the journal, once
    sync = Outbox(tracker, tmp_path / JOURNAL, delays=FAST)
    assert sync.load_journal() == 2 and sync.completed == {"k1", "k2"}
    sync.start()
    assert sync.drain(30)
    sync.close()
    assert_exactly_once(tracker, ["k1", "k2"])
    again = Outbox(tracker, tmp_path / JOURNAL, delays=FAST)
    assert again.load_journal() == 0  # everything acknowledged: a second sync has nothing to deliver


def test_drain_waits_for_a_busy_store_and_gives_up_only_on_one_that_delivers_nothing(tmp_path):
    tracker, parent = tracker_and_parent(tmp_path)
    log_rows = tracker.log_rows

    def busy_store(*args, **kwargs):  # a busy store: every batch takes 0.3 s, well under the drain's 2 s even when
        time.sleep(0.3)               # the cores are loaded (CI saw a 0.1 s batch + its commits take over 0.5 s)
        return log_rows(*args, **kwargs)

    tracker.log_rows = busy_store
    outbox = Outbox(tracker, None, delays=FAST, writers=1)
    for i in range(10):
        trial_ops(outbox, parent, f"k{i}")
    started = time.perf_counter()
    outbox.start()
    assert outbox.drain(2.0)  # each write takes well under 2 s; all of them together take longer (>= 3 s)
    assert time.perf_counter() - started > 2.0
    outbox.close()
    tracker.client = MlflowClient(tracking_uri=closed_port_uri())  # a store that delivers nothing
    outbox = Outbox(tracker, None, delays=FAST).start()
    trial_ops(outbox, parent, "k-down")
    started = time.perf_counter()
    assert not outbox.drain(0.5)
    assert time.perf_counter() - started < 10
    outbox.close()


def test_a_finished_trials_state_is_not_kept_and_a_rerun_of_it_still_duplicates_nothing(tmp_path):
    """The writer keeps no per-trial state once a trial's finish is delivered (a 100,000-trial sweep's driver
    would grow with it); a trial run again later (a FAILED one retried) reads its steps back from the store."""
    tracker, parent = tracker_and_parent(tmp_path)
    outbox = Outbox(tracker, None, delays=FAST).start()
    for key in ("k1", "k2"):
        trial_ops(outbox, parent, key)
    assert outbox.drain(30)
    assert outbox._trials == {}  # noqa: SLF001
    trial_ops(outbox, parent, "k1")  # the same trial again: every step already stored
    assert outbox.drain(30)
    outbox.close()
    assert outbox._trials == {}  # noqa: SLF001
    assert_exactly_once(tracker, ["k1", "k2"])


def test_delivery_resumes_by_itself_when_the_store_comes_back(tmp_path):
    tracker, parent = tracker_and_parent(tmp_path)
    live = tracker.client
    tracker.client = MlflowClient(tracking_uri=closed_port_uri())
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST).start()
    trial_ops(outbox, parent, "k1")
    deadline = time.time() + 20
    while outbox.stats.failures < 3 and time.time() < deadline:
        time.sleep(0.05)
    assert outbox.stats.failures >= 3
    tracker.client = live  # the server restarted
    trial_ops(outbox, parent, "k2")
    assert outbox.drain(30)
    outbox.close()
    assert_exactly_once(tracker, ["k1", "k2"])


def test_replaying_writes_that_reached_the_store_but_were_never_acknowledged_duplicates_nothing(tmp_path):
    """A driver killed (or a server that died) after a write was stored but before it was acknowledged: the
    journal still holds the operations; replaying them finds the run by its key and logs no step twice."""
    tracker, parent = tracker_and_parent(tmp_path)
    first = Outbox(tracker, None, delays=FAST).start()  # delivers, writes no journal (so: no acks)
    trial_ops(first, parent, "k1")
    assert first.drain(30)
    first.close()
    recorder = Outbox(tracker, None)
    recorder._put = lambda ops, write=True: Journal(tmp_path / JOURNAL).append(op.line() for op in ops)  # noqa: SLF001
    trial_ops(recorder, parent, "k1")  # the same operations, only journaled
    replay = Outbox(tracker, tmp_path / JOURNAL, delays=FAST)
    assert replay.load_journal() == 1
    replay.start()
    assert replay.drain(30)
    replay.close()
    assert_exactly_once(tracker, ["k1"])


def test_a_torn_last_journal_line_is_skipped(tmp_path):
    journal = Journal(tmp_path / JOURNAL)
    journal.append([Op("k1", "open", {"parent": "p", "sweep": "s", "name": "n", "params": {}}).line(),
                    Op("k1", "finish", {"status": "FINISHED"}).line()])
    with journal.path.open("a") as f:
        f.write('{"key": "k1", "op": "ro')  # the driver was killed mid-write
    assert [op.kind for op in journal.pending()] == ["open", "finish"]


def test_the_outbox_pickles_for_tunes_experiment_state(tmp_path):
    tracker, _ = tracker_and_parent(tmp_path)
    outbox = Outbox(tracker, tmp_path / JOURNAL).start()
    try:
        restored = pickle.loads(pickle.dumps(outbox))
        assert restored.pending_ops() == 0 and restored.journal is None
    finally:
        outbox.close()


def test_sync_cli_without_a_journal_says_so_and_with_one_on_a_down_server_names_the_fix(tmp_path, capsys):
    from sophon_ray.cli import main

    spec = tmp_path / "s.yaml"
    spec.write_text(f"name: synced\noutput_dir: {tmp_path}/out\ntracking: {{uri: '{closed_port_uri()}'}}\n")
    assert main(["sync", str(spec)]) == 0
    assert "nothing to deliver" in capsys.readouterr().out
    Journal(tmp_path / "out" / JOURNAL).append([Op("k1", "finish", {"status": "FINISHED"}).line()])
    assert main(["sync", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "does not answer" in err and "Fix: start it" in err and "Traceback" not in err


def test_an_operation_of_a_trial_never_opened_is_dropped_and_blocks_no_other_trial(tmp_path):
    tracker, parent = tracker_and_parent(tmp_path)
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST)
    outbox.finish("never-started", "FAILED")  # Tune can error a trial it never started
    trial_ops(outbox, parent, "k1")
    outbox.start()
    assert outbox.drain(30)
    outbox.close()
    assert_exactly_once(tracker, ["k1"])
    assert Journal(tmp_path / JOURNAL).pending() == []


def test_the_tune_callback_opens_the_run_of_a_trial_tune_errors_before_starting_it(tmp_path):
    """Tune's own Trial objects (stubs: no Ray cluster) through the real callback: a trial errored before it
    started still gets its run opened first, so its FAILED status lands and blocks nothing behind it."""
    from ray.tune.experiment import Trial as TuneTrial

    from sophon_ray.run.plan import plan_trials
    from sophon_ray.run.tune_driver import LAST_REPORT, make_callback
    from sophon_ray.run.validate import parse_spec

    tracker, parent = tracker_and_parent(tmp_path)
    planned = plan_trials(parse_spec({"attack": {"subjects": ["normal"], "evaluation": {"optimizer": ["sgd", "adam"]}}}),
                          [])[:2]
    never, ran = (TuneTrial("attack_trial", config={"key": t.key}, stub=True) for t in planned)
    outbox = Outbox(tracker, None, delays=FAST).start()
    callback = make_callback(tracker, parent, "sweep1", outbox)

    class Mail:  # the trial mail's reader: the trial's rows and files arrive beside Tune's (scalar) result
        boxes = {ran.trial_id: ([{"epoch": 0, names.RESTRICTED_ACC: 10.0}, {"epoch": 1, names.RESTRICTED_ACC: 20.0}],
                                {})}

        def take(self, trial_id):
            return self.boxes.pop(trial_id, ([], {}))

    callback.attach(Mail(), {t.key: t for t in planned})
    callback.on_trial_error(0, [], never)                       # no on_trial_start before it
    callback.on_trial_start(0, [], ran)
    callback.on_trial_result(0, [], ran, {LAST_REPORT: True,
                                          names.FINAL: 20.0, names.BEST: 20.0, names.ORIGINAL_ACC: 90.0,
                                          "node_id": "n1"})
    callback.on_trial_complete(0, [], ran)
    assert outbox.drain(30)
    outbox.close()
    client = MlflowClient(tracking_uri=tracker.uri)
    status = {r.data.tags[names.KEY]: r.info.status for r in client.search_runs([tracker.experiment_id])
              if r.data.tags.get(names.ROLE) == "attack"}
    assert status == {planned[0].key: "FAILED", planned[1].key: "FINISHED"}


def test_resume_delivers_the_journal_first_and_reruns_no_trial_whose_result_is_in_it(tmp_path):
    """The attack stage of a resumed sweep whose trials all finished, with results only in the journal: they are
    delivered, counted as finished earlier, and no trial is run (the stage returns before Ray is started)."""
    import io

    from sophon_ray.console.terminal import Console
    from sophon_ray.run.context import Outcome, RunContext, RunOptions, View
    from sophon_ray.run.stages import attack_stage
    from sophon_ray.run.plan import plan_trials
    from sophon_ray.run.validate import parse_spec

    tracker, parent = tracker_and_parent(tmp_path)
    spec = parse_spec({"attack": {"subjects": ["normal"], "evaluation": {"optimizer": ["sgd", "adam"]}}})
    trials = plan_trials(spec, [])
    recorder = Outbox(tracker, tmp_path / JOURNAL)  # the earlier run: everything journaled, nothing delivered
    for t in trials:
        trial_ops(recorder, parent, t.key)
    shown = io.StringIO()
    outcome = Outcome("sweep1", len(trials))
    attack_stage(RunContext(spec, "sweep1", tracker, parent, tmp_path, RunOptions(resume=True), View(Console(shown)),
                            outcome), trials, {})
    assert f"{len(trials)} trial(s) with results not yet in MLflow, delivered now" in shown.getvalue()
    assert f"{len(trials)} finished earlier, 0 to run" in shown.getvalue()
    assert outcome.pending == 0 and outcome.trials_run == 0
    assert_exactly_once(tracker, [t.key for t in trials])


class RecordingTracker(Tracker):
    """The real Tracker, recording which delivery thread made each of a trial's store calls, in order."""

    def __init__(self, uri: str, experiment: str) -> None:
        super().__init__(uri, experiment)
        self.calls: list[tuple[str, str, str]] = []  # (thread, key or run id, call)
        self._keys: dict[str, str] = {}

    def open_child(self, parent_id, sweep_id, role, key, name, params=None, **kw):
        opened = super().open_child(parent_id, sweep_id, role, key, name, params, **kw)
        self._keys[opened[0]] = key
        self.calls.append((threading.current_thread().name, key, "open"))
        return opened

    def log_rows(self, run_id, rows, params=None, tags=None):
        super().log_rows(run_id, rows, params, tags)
        self.calls.append((threading.current_thread().name, self._keys.get(run_id, run_id), "rows"))

    def finish(self, run_id, status="FINISHED", end_ms=None):
        super().finish(run_id, status, end_ms)
        self.calls.append((threading.current_thread().name, self._keys[run_id], "finish"))


class LostReplyTracker(Tracker):
    """The real Tracker whose store writes succeed and whose answer is then lost (a ConnectionError raised after
    the write), once for each call named in ``lose``: the window a retry must not duplicate."""

    def __init__(self, uri: str, experiment: str, lose: set[tuple[str, int]]) -> None:
        super().__init__(uri, experiment)
        self.lose, self.count = lose, Counter()
        real = self.client.create_run

        def create_run(*args, **kwargs):
            run = real(*args, **kwargs)
            self._maybe_lose("create_run")
            return run

        self.client.create_run = create_run

    def _maybe_lose(self, call: str) -> None:
        self.count[call] += 1
        if (call, self.count[call]) in self.lose:
            raise ConnectionError(f"{call} #{self.count[call]}: stored, answer lost")

    def log_rows(self, run_id, rows, params=None, tags=None):
        super().log_rows(run_id, rows, params, tags)
        self._maybe_lose("log_rows")


def test_parallel_writers_keep_each_trials_order_on_one_thread_and_deliver_exactly_once(tmp_path):
    """4 delivery threads, 24 trials whose operations arrive interleaved and while earlier ones are delivered:
    several threads deliver, every trial's calls are open, rows, finish in that order, each trial on one thread
    per round, every trial exactly once, all acknowledged."""
    tracker = RecordingTracker(f"sqlite:///{tmp_path}/mlflow.db", "outbox")
    parent = tracker.sweep_run("sweep1", "sweep")
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST, writers=4).start()
    keys = [f"k{i}" for i in range(24)]
    for key in keys:
        outbox.open(key, parent, "sweep1", f"name-{key}", {"lr": 0.01, "optimizer": "adam"})
    for key in keys:  # a trial's rows arrive while its open (or another trial's) is being delivered
        outbox.rows(key, [(e, {names.RESTRICTED_ACC: 10.0 + e, names.RESTRICTED_LOSS: 2.0 - e / 10})
                          for e in range(EPOCHS + 1)])
    for key in keys:
        outbox.rows(key, [(EPOCHS, {names.RESTRICTED_ACC: 10.0 + EPOCHS, names.RESTRICTED_LOSS: 2.0 - EPOCHS / 10}),
                          (0, {names.FINAL: 13.0, names.BEST: 13.0, names.ORIGINAL_ACC: 90.0})])
        outbox.tag(key, names.NODE, "node-a")
        outbox.finish(key, "FINISHED")
    assert outbox.drain(60)
    outbox.close()
    assert outbox.stats.failures == 0
    assert len({thread for thread, _, _ in tracker.calls}) > 1, "one thread delivered everything: not parallel"
    for key in keys:
        kinds = [kind for _, k, kind in tracker.calls if k == key]
        assert kinds[0] == "open" and kinds[-1] == "finish" and kinds.count("open") == 1, (key, kinds)
        assert set(kinds[1:-1]) == {"rows"}, (key, kinds)
    assert_exactly_once(tracker, keys)
    assert Journal(tmp_path / JOURNAL).pending() == []


def test_a_lost_answer_mid_round_is_read_back_and_replayed_without_duplicates(tmp_path):
    """One round of 6 trials (one writer takes them all): the 3rd trial's run is created but the answer is lost,
    later the 6th trial's batch is stored but its answer lost. The trials before the failure are acknowledged,
    the failed one is looked up by its key (not created again: one run), its stored rows are read back (no step
    twice), and the rest are delivered: every trial exactly once."""
    tracker = LostReplyTracker(f"sqlite:///{tmp_path}/mlflow.db", "outbox", {("create_run", 3), ("log_rows", 6)})
    parent = tracker.sweep_run("sweep1", "sweep")
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST, writers=1)
    keys = [f"k{i}" for i in range(6)]
    for key in keys:
        trial_ops(outbox, parent, key)
    outbox.start()
    assert outbox.drain(60)
    outbox.close()
    assert outbox.stats.failures == 2
    assert_exactly_once(tracker, keys)
    acks = [r["key"] for r in Journal(tmp_path / JOURNAL).records() if r["op"] == "ack"]
    assert sorted(acks) == keys  # each trial acknowledged once


def test_the_journal_fsyncs_every_append_or_groups_appends_within_its_bound(tmp_path):
    line = Op("k1", "finish", {"status": "FINISHED"}).line()
    every = Journal(tmp_path / "every.jsonl", fsync_s=0.0)
    for _ in range(5):
        every.append([line])
    assert every.syncs == 5
    never = Journal(tmp_path / "never.jsonl", fsync_s=None)
    never.append([line])
    never.close()
    assert never.syncs == 0 and len(never.records()) == 1

    grouped = Journal(tmp_path / "grouped.jsonl", fsync_s=0.2)
    for _ in range(50):
        grouped.append([line])
    assert grouped.syncs == 0  # nothing waited for the disk
    deadline = time.monotonic() + 5
    while grouped.syncs == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert grouped.syncs == 1  # the 50 appends, in one fsync, within the bound
    grouped.append([line])
    grouped.close()            # what is not on disk yet is fsynced on close
    assert grouped.syncs == 2 and len(grouped.records()) == 51
    grouped.append([line])     # a closed journal reopens on the next append
    grouped.close()
    assert len(grouped.records()) == 52


def test_fsync_and_writer_settings_read_their_variables_and_name_them_when_bad(monkeypatch):
    monkeypatch.delenv(FSYNC_ENV, raising=False)
    assert fsync_seconds() == DEFAULT_FSYNC_S
    for text, value in (("every", 0.0), ("off", None), ("0.5", 0.5)):
        monkeypatch.setenv(FSYNC_ENV, text)
        assert fsync_seconds() == value
    monkeypatch.setenv(FSYNC_ENV, "sometimes")
    with pytest.raises(TrackingError, match=FSYNC_ENV):
        fsync_seconds()
    monkeypatch.delenv(WRITERS_ENV, raising=False)
    assert writers_for("sqlite:////x/mlflow.db") == SQLITE_WRITERS and writers_for("http://h:5000") == SERVER_WRITERS
    monkeypatch.setenv(WRITERS_ENV, "3")
    assert writers_for("sqlite:////x/mlflow.db") == 3
    monkeypatch.setenv(WRITERS_ENV, "0")
    with pytest.raises(TrackingError, match=WRITERS_ENV):
        writers_for("http://h:5000")


def test_an_open_delivered_alone_leaves_its_params_for_the_next_batch_and_a_finished_run_always_has_them(tmp_path):
    """Tune opens a trial's run when it starts: the open is delivered (and acknowledged) alone, its params wait
    for the trial's rows. They land with them, also when the trial is opened again meanwhile (a retried trial),
    and when the rest comes from the journal to a new outbox (a driver that died after the open)."""
    tracker, parent = tracker_and_parent(tmp_path)
    outbox = Outbox(tracker, tmp_path / JOURNAL, delays=FAST).start()
    for key in ("k1", "k2"):
        outbox.open(key, parent, "sweep1", f"name-{key}", {"lr": 0.01, "optimizer": "adam"})
    assert outbox.drain(30)
    client = MlflowClient(tracking_uri=tracker.uri)
    runs = {r.data.tags[names.KEY]: r for r in client.search_runs([tracker.experiment_id])
            if r.data.tags.get(names.ROLE) == "attack"}
    assert set(runs) == {"k1", "k2"} and runs["k1"].data.params == {}  # one store call for the open alone
    trial_ops(outbox, parent, "k1")  # opened again (a retried trial), then its results
    assert outbox.drain(30)
    outbox.close()
    for op in [Op("k2", "rows", {"rows": [[e, {names.RESTRICTED_ACC: 10.0 + e, names.RESTRICTED_LOSS: 2.0 - e / 10}]
                                          for e in range(EPOCHS + 1)]}),
               Op("k2", "rows", {"rows": [[0, {names.FINAL: 13.0, names.BEST: 13.0, names.ORIGINAL_ACC: 90.0}]]}),
               Op("k2", "tag", {"tag": names.NODE, "value": "node-a"}), Op("k2", "finish", {"status": "FINISHED"})]:
        outbox.journal.append([op.line()])  # journaled, never delivered: the driver died
    replay = Outbox(tracker, tmp_path / JOURNAL, delays=FAST)
    assert replay.load_journal() == 1
    replay.start()
    assert replay.drain(30)
    replay.close()
    assert_exactly_once(tracker, ["k1", "k2"])


def test_runs_of_other_roles_attached_runs_and_files_replay_exactly_once(tmp_path):
    """What the pipeline journals besides trials: a protect run opened by key (its role in the journal), the parent
    run attached by id (its stage times, a report file, its finish); delivered, then the whole journal replayed
    without its acks by a new outbox (as ``sophon-ray sync`` does): one run per key, one point per step, one file per
    name, the role kept. A file deleted before its delivery is dropped and blocks nothing."""
    tracker, parent = tracker_and_parent(tmp_path)
    figure = tmp_path / "report" / "heatmap.png"
    figure.parent.mkdir()
    figure.write_bytes(b"png-bytes")
    gone = tmp_path / "gone.txt"
    gone.write_text("x")
    lines = []
    recorder = Outbox(tracker, None)
    recorder._put = lambda ops, write=True: lines.extend(op.line() for op in ops)  # noqa: SLF001
    recorder.open("protect-abc", parent, "sweep1", "protect/v/s0", {"alpha": 0.5}, role="protect")
    recorder.rows("protect-abc", [(0, {"original_val": 90.0}), (5, {"original_val": 91.0})])
    recorder.file("protect-abc", figure, "checkpoint")
    recorder.finish("protect-abc", "FINISHED")
    recorder.attach("sweep-sweep1", parent)
    recorder.rows("sweep-sweep1", [(0, {"seconds_attack": 12.5})])
    recorder.file("sweep-sweep1", gone, "report")
    recorder.file("sweep-sweep1", figure, "report")
    recorder.finish("sweep-sweep1", "FINISHED")
    assert '"role":"protect"' in lines[0] and all('"role"' not in line for line in lines[1:])
    gone.unlink()
    for _ in range(2):  # the second replay: everything already stored (no acks were journaled)
        Journal(tmp_path / "replay.jsonl").path.write_text("".join(lines))
        outbox = Outbox(tracker, tmp_path / "replay.jsonl", delays=FAST)
        assert outbox.load_journal() == 2
        outbox.start()
        assert outbox.drain(30)
        outbox.close()
        assert outbox.pending_keys() == set()
    client = MlflowClient(tracking_uri=tracker.uri)
    runs = client.search_runs([tracker.experiment_id], max_results=100)
    protect = [r for r in runs if r.data.tags.get(names.KEY) == "protect-abc"]
    assert len(protect) == 1 and protect[0].data.tags[names.ROLE] == "protect"
    assert protect[0].info.status == "FINISHED" and protect[0].data.params == {"alpha": "0.5"}
    assert protect[0].data.tags[names.PARENT] == parent
    history = client.get_metric_history(protect[0].info.run_id, "original_val")
    assert sorted((m.step, m.value) for m in history) == [(0, 90.0), (5, 91.0)]
    assert [a.path for a in client.list_artifacts(protect[0].info.run_id, "checkpoint")] == ["checkpoint/heatmap.png"]
    assert len(client.get_metric_history(parent, "seconds_attack")) == 1
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/heatmap.png"]
    assert client.get_run(parent).info.status == "FINISHED"
    assert tracker.keyed_runs("sweep1", "protect").keys() == {"protect-abc"}


def test_the_models_stage_journals_every_model_when_the_store_cannot_say_which_finished(tmp_path, caplog):
    from types import SimpleNamespace

    from sophon_ray.run.stages import finished_or_none

    def down(sweep_id, role):
        raise ConnectionError("connection refused")

    assert finished_or_none(SimpleNamespace(finished_keys=lambda sid, role: {f"{role}-1"}), "s", ("a", "b")) == {
        "a-1", "b-1"}
    assert finished_or_none(SimpleNamespace(finished_keys=down), "s", ("a",)) == set()
    assert "journaling them all" in caplog.text


def test_an_error_while_the_store_is_gone_ends_the_stage_as_an_outage_and_any_other_error_is_raised(tmp_path,
                                                                                                   monkeypatch):
    """A stage whose work fails while the store does not answer is an outage (exit 3, the journal kept); the same
    error while the store answers is the stage's own and is raised."""
    from types import SimpleNamespace

    from sophon_ray.run.context import Outcome
    from sophon_ray.run.stages import through_outbox

    tracker, parent = tracker_and_parent(tmp_path)
    said: list[str] = []
    ctx = SimpleNamespace(tracker=tracker, out=tmp_path, outcome=Outcome("s", 1), say=said.append, outbox=None)

    def work(outbox, wait):
        outbox.load_journal()
        outbox.start()
        trial_ops(outbox, parent, "k1")
        assert outbox.drain(30)
        raise ConnectionError("the store went away")

    with pytest.raises(ConnectionError):   # the store answers: not an outage
        through_outbox(ctx, work)
    assert not ctx.outcome.incomplete
    def refused(outbox, wait):
        raise ConnectionError("refused")

    monkeypatch.setenv(WAIT_ENV, "1")
    tracker.client = MlflowClient(tracking_uri=closed_port_uri())
    through_outbox(ctx, refused, reads=False)
    assert ctx.outcome.incomplete and ctx.outcome.store_down and ctx.outcome.pending == 0
    assert "INCOMPLETE" in said[-1] and str(tmp_path / JOURNAL) in said[-1]
    ctx.outcome = Outcome("s", 1)
    through_outbox(ctx, lambda outbox, wait: None)   # a stage that reads: the store never answers within the wait
    assert ctx.outcome.store_down and ctx.outcome.incomplete


def test_the_first_stage_of_a_resumed_run_says_how_many_runs_wait_in_the_journal_and_delivers_them(tmp_path):
    """The models stage replays the whole journal (attack trials' results included), so it is the one that says so;
    a journal with nothing pending says nothing."""
    from types import SimpleNamespace

    from sophon_ray.run.stages import replay_journal

    tracker, parent = tracker_and_parent(tmp_path)
    recorder = Outbox(tracker, tmp_path / JOURNAL)  # an earlier run: journaled, never delivered
    for key in ("k1", "k2"):
        trial_ops(recorder, parent, key)
    said: list[str] = []
    ctx = SimpleNamespace(say=said.append)
    outbox = Outbox(tracker, tmp_path / JOURNAL)
    assert replay_journal(ctx, outbox, "[1/4]") == 2
    assert said == ["[1/4] journal: 2 run(s) with writes not yet in MLflow (an earlier run's), delivered first"]
    outbox.start()
    assert outbox.drain(30)
    outbox.close()
    assert tracker.finished_keys("sweep1", "attack") == {"k1", "k2"}
    said.clear()
    assert replay_journal(ctx, Outbox(tracker, tmp_path / JOURNAL), "[1/4]") == 0 and said == []


def test_writes_a_store_that_answers_keeps_refusing_end_the_stage_naming_their_error_not_an_outage(tmp_path,
                                                                                                  monkeypatch):
    """A write that fails every time while the store answers (a bug, a full disk, a permission) ends the stage with
    exit 3 and the journal kept, like an outage, but the message says the store answered and names the error."""
    from types import SimpleNamespace

    from sophon_ray.run.context import Outcome
    from sophon_ray.run.stages import through_outbox

    tracker, parent = tracker_and_parent(tmp_path)

    def broken(*args, **kwargs):
        raise TypeError("finish() takes 3 arguments")

    tracker.finish = broken
    monkeypatch.setenv(WAIT_ENV, "1")
    said: list[str] = []
    ctx = SimpleNamespace(tracker=tracker, out=tmp_path, outcome=Outcome("s", 1), say=said.append, outbox=None)

    def work(outbox, wait):
        outbox.start()
        trial_ops(outbox, parent, "k1")

    through_outbox(ctx, work, reads=False)
    assert ctx.outcome.incomplete and ctx.outcome.pending == 1 and not ctx.outcome.store_down
    assert "TypeError: finish() takes 3 arguments" in ctx.outcome.refused
    assert "answers but kept failing the writes of 1 run(s)" in said[-1] and str(tmp_path / JOURNAL) in said[-1]
    assert "did not answer" not in said[-1]
