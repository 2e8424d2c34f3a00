"""The console: live line on a terminal, plain paced lines elsewhere, ETA math, trial counts, job lines, the log
capture and the closing block (no Ray here; the summary table is tested in test_analysis.py)."""

import io
import logging
import os
import sys
import time
import warnings

import pytest

from sophon_ray.console import terminal as console
from sophon_ray.console.terminal import Console, Line, LogCapture, eta_seconds, format_duration, link_ray_logs, plain, plain_gap
from sophon_ray.run.context import Outcome
from sophon_ray.run.texts import closing_text, failure_hint, mlflow_hint
from sophon_ray.console.progress import AttackProgress, ProgressSender, TrainJob, TrainProgress, job_line


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Source:
    """Jobs whose text a test sets; a text ending in 'done' is final."""

    def __init__(self) -> None:
        self.value = {"a": "job a: step 0/4"}

    def status(self):
        return {key: Line(text, text.endswith("done")) for key, text in self.value.items()}


def test_eta_is_the_average_pace_over_what_is_left():
    assert eta_seconds(25, 100, 50.0) == pytest.approx(150.0)
    assert eta_seconds(0, 100, 50.0) is None          # no pace yet
    assert eta_seconds(100, 100, 50.0) == 0.0
    assert eta_seconds(120, 100, 50.0) == 0.0


def test_durations_read_as_seconds_minutes_hours():
    assert [format_duration(s) for s in (0, 45.4, 65, 3599, 3600 + 7 * 60 + 20)] == ["0s", "45s", "1m05s",
                                                                                     "59m59s", "1h07m"]
    assert format_duration(None) == format_duration(float("nan")) == format_duration(-1) == "?"


def test_plain_text_has_no_control_characters():
    assert plain("a\rb\x1b[2Kc\nd\te") == "a b [2Kc d e"


def test_plain_lines_slow_down_as_a_stage_goes_on():
    assert plain_gap(0) == console.MIN_GAP_S
    assert plain_gap(10 * console.MIN_GAP_S) == 2 * console.MIN_GAP_S
    assert plain_gap(10_000) == console.MAX_GAP_S


def test_not_a_terminal_gives_plain_lines_without_control_characters():
    stream = io.StringIO()
    con = Console(stream)
    assert not con.live
    source = Source()
    with con.progress(source, prefix="[1/4]", tick_s=0.01):
        con.say("a stage line")
        for i in range(1, 5):
            source.value = {"a": f"job a: step {i}/4", "b": "job b: waiting"}
            time.sleep(0.05)
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text and "\b" not in text
    lines = text.splitlines()
    # the first state at once, the final state at the end; in between nothing (MIN_GAP_S not reached)
    assert lines[0] == "[1/4] job a: step 0/4" and "a stage line" in lines
    assert lines[-2:] == ["[1/4] job a: step 4/4", "[1/4] job b: waiting"]
    assert len(lines) == 4


def test_plain_lines_do_not_repeat_an_unchanged_job(monkeypatch):
    monkeypatch.setattr(console, "MIN_GAP_S", 0.0)
    stream = io.StringIO()
    con = Console(stream)
    source = Source()
    source.value = {"a": "job a: step 4/4", "b": "job b: step 1/4"}
    with con.progress(source, tick_s=0.01):
        time.sleep(0.05)
        source.value = {"a": "job a: done", "b": "job b: step 2/4"}
        time.sleep(0.05)
    lines = stream.getvalue().splitlines()
    assert lines == ["job a: step 4/4", "job b: step 1/4", "job a: done", "job b: step 2/4"]


def test_a_finished_job_is_printed_at_once_not_at_the_next_due_line():
    stream = io.StringIO()
    con = Console(stream)
    source = Source()
    with con.progress(source, tick_s=0.01):
        source.value = {"a": "job a: done", "b": "job b: step 1/4"}
        time.sleep(0.05)
        assert stream.getvalue().splitlines() == ["job a: step 0/4", "job a: done"]
    assert stream.getvalue().splitlines()[-1] == "job b: step 1/4"


def test_a_terminal_gets_one_line_rewritten_in_place():
    stream = FakeTerminal()
    con = Console(stream, width=60)
    assert con.live
    source = Source()
    with con.progress(source, prefix="[2/4]", tick_s=0.01):
        source.value = {"a": "a much longer state of job a, step 3 of 4", "b": "b " * 40}
        time.sleep(0.05)
        con.say("a permanent line")
        source.value = {"a": "short"}
        time.sleep(0.05)
    text = stream.getvalue()
    assert "\x1b" not in text and "\r" in text
    # the last state overwrites the longer one before it (blanks to the end of the old line), then a newline
    assert text.endswith("\r[2/4] short" + " " * (59 - len("[2/4] short")) + "\n")
    # a permanent line is written on a cleared line and ends with a newline
    assert "\ra permanent line\n" in text
    assert max(len(part) for part in text.replace("\n", "\r").split("\r")) <= 59


def test_a_terminal_keeps_finished_jobs_as_permanent_lines():
    stream = FakeTerminal()
    con = Console(stream, width=80)
    source = Source()
    with con.progress(source, tick_s=0.01):
        source.value = {"a": "job a: done", "b": "job b: step 1/4"}
        time.sleep(0.05)
    permanent = [part.strip() for part in stream.getvalue().split("\n")]
    assert "job a: done" in [p.split("\r")[-1].strip() for p in permanent]
    assert stream.getvalue().rstrip("\n").split("\r")[-1].strip() == "job b: step 1/4"


def test_verbose_uses_plain_lines_even_on_a_terminal():
    assert not Console(FakeTerminal(), verbose=True).live


def test_attack_counts_and_eta_from_the_hooks():
    now = [0.0]
    progress = AttackProgress(4, clock=lambda: now[0])
    assert progress.line() == "attack trials: 0/4 done | 0 running | 0 failed | waiting for Ray Tune"
    progress.started("t1")
    progress.started("t2")
    assert progress.line().endswith("| 2 running | 0 failed | ETA after the first trial")
    now[0] = 10.0
    progress.completed("t1")
    progress.recovered("t2")        # failed once, Tune queued it again
    progress.started("t2")
    progress.started("t3")
    assert progress.line() == "attack trials: 1/4 done | 2 running | 0 failed | 1 retried | ETA 30s"
    now[0] = 20.0
    progress.errored("t2")
    progress.completed("t3")
    progress.started("t4")
    assert progress.eta() == pytest.approx(20.0 / 3)
    now[0] = 30.0
    progress.completed("t4")
    now[0] = 99.0
    assert progress.status() == {"attack": Line("attack trials: 3/4 done | 0 running | 1 failed | 1 retried | "
                                                "took 30s", final=True)}


def test_job_lines_show_step_metrics_and_eta():
    state = {"stage": "protect", "step": 100, "total": 400, "seconds": 50.0, "done": False,
             "metrics": {"fts_loss": 2.3104, "ntr_loss": 0.41, "original_acc": 91.23}}
    assert job_line("ice-s0", state) == ("protect ice-s0: iteration 100/400 | fts_loss 2.310 | ntr_loss 0.410 | "
                                         "original_acc 91.2 | ETA 2m30s")
    assert job_line("ice-s0", {**state, "step": 400}).endswith("finishing (probe and test evaluation)")
    assert job_line("ice-s0", {**state, "step": 400, "done": True, "seconds": 201.0}).endswith("done in 3m21s")
    pretrain = {"stage": "pretrain", "step": 2, "total": 8, "seconds": 10.0, "metrics": {"val_acc": 80.0}}
    assert job_line("normal", pretrain) == "pretrain normal: epoch 2/8 | val acc 80.0 | ETA 30s"


def test_train_progress_shows_started_jobs_and_keeps_the_last_snapshot_when_a_poll_fails():
    snapshots = [{}, {"normal": {"stage": "pretrain", "step": 1, "total": 2, "seconds": 1.0, "metrics": {}}}]

    def poll():
        if not snapshots:
            raise TimeoutError("board busy")
        return snapshots.pop(0)

    shown = TrainProgress([TrainJob("normal", "pretrain", 2), TrainJob("ice-s0", "protect", 4)], poll)
    assert shown.status() == {"": Line("waiting for Ray Train workers (2 job(s))")}
    assert shown.status() == {"normal": Line("pretrain normal: epoch 1/2 | ETA 1s")}
    assert shown.status() == {"normal": Line("pretrain normal: epoch 1/2 | ETA 1s")}


def test_sender_without_a_board_keeps_the_latest_metrics():
    sender = ProgressSender(None, "ice-s0", "protect", 4)
    sender(1, {"fts_loss": 1.0, "adversary_loss": 5.0})
    sender(2, {"ntr_loss": 0.5})
    sender.finish(original_acc=90.0)
    assert sender.state["step"] == 2 and sender.state["done"]
    assert sender.state["metrics"] == {"fts_loss": 1.0, "ntr_loss": 0.5, "original_acc": 90.0}


def test_log_capture_sends_library_logs_and_warnings_to_the_file_and_keeps_our_warnings(tmp_path):
    stderr = io.StringIO()
    root = logging.getLogger()
    console_handler = logging.StreamHandler(stderr)
    library = logging.getLogger("somelib")
    library_handler = logging.StreamHandler(stderr)
    library.addHandler(library_handler)
    library.propagate = False
    tune = logging.getLogger("ray.tune")
    tune_level = tune.level
    tune.setLevel(logging.INFO)  # an earlier in-process ray.init(logging_level=...) in this worker must not matter
    root.addHandler(console_handler)
    try:
        capture = LogCapture(tmp_path / "logs", verbose=False)
        library.warning("library noise")
        logging.getLogger("ray.tune").warning("tune noise")
        logging.getLogger("sophon_ray.run.pipeline").info("our info")
        logging.getLogger("sophon_ray.run.pipeline").warning("our warning")
        warnings.warn("a python warning", UserWarning, stacklevel=1)
        print("printed \x1b[33m(raylet)\x1b[0m noise")
        capture.file.setFormatter(logging.Formatter("%(message)s"))  # as ray.init does
        sys.stderr.write("half a line")
        capture.close()
        library.warning("after close")
        restored = library.handlers == [library_handler] and console_handler.filters == []
    finally:
        root.removeHandler(console_handler)
        library.removeHandler(library_handler)
        library.propagate = True
        tune.setLevel(tune_level)
    assert stderr.getvalue().splitlines() == ["our warning", "after close"]
    logged = (tmp_path / "logs" / "sophon-ray.log").read_text()
    for text in ("library noise", "tune noise", "our info", "our warning", "a python warning",
                 "INFO stdout: printed (raylet) noise", "INFO stderr: half a line"):
        assert text in logged
    assert "\x1b" not in logged
    assert "after close" not in logged
    assert restored


def test_verbose_log_capture_leaves_the_console_alone(tmp_path):
    stderr = io.StringIO()
    library = logging.getLogger("otherlib")
    handler = logging.StreamHandler(stderr)
    library.addHandler(handler)
    library.propagate = False
    try:
        capture = LogCapture(tmp_path / "logs", verbose=True)
        library.warning("shown and logged")
        capture.close()
    finally:
        library.removeHandler(handler)
        library.propagate = True
    assert stderr.getvalue() == "shown and logged\n" and not isinstance(sys.stdout, console.StreamToLog)
    assert "shown and logged" in (tmp_path / "logs" / "sophon-ray.log").read_text()


def test_ray_logs_are_linked_into_the_log_folder(tmp_path):
    session = tmp_path / "session" / "logs"
    session.mkdir(parents=True)
    (tmp_path / "logs").mkdir()
    link = link_ray_logs(tmp_path / "logs", session)
    assert link is not None and link.resolve() == session.resolve()
    assert link_ray_logs(tmp_path / "logs", session) == link          # a rerun replaces the link
    assert link_ray_logs(tmp_path / "logs", tmp_path / "missing") is None


def test_closing_text_names_the_report_the_mlflow_ui_and_the_logs():
    from types import SimpleNamespace  # the attributes of analysis.report's ReportResult that the text reads

    report = SimpleNamespace(overview="TABLE", summary="/o/report/summary.md", html="/o/report/report.html",
                             heatmaps=["/o/report/h.png"])
    outcome = Outcome("abc", 10, 10, report=report,
                      stage_seconds={"pretrain+protect": 10.0, "attack": 20.0},
                      tracking_uri="sqlite:////tmp/m.db", output_dir="/o", log_dir="/o/logs")
    text = closing_text(outcome, 31.2, "sweeps/q.yaml")
    assert text.splitlines() == [
        "done in 31 s (pretrain+protect 10 s, attack 20 s); 10 trials, 10 run now", "", "TABLE", "",
        "report (one page, open it in a browser): /o/report/report.html",
        "full report: /o/report/summary.md", "heatmaps: /o/report/h.png",
        "MLflow UI: sophon-ray ui sweeps/q.yaml  (or: mlflow ui --backend-store-uri sqlite:////tmp/m.db "
        "--host 127.0.0.1 --port 5000, then 'Model training')", "logs: /o/logs"]
    assert mlflow_hint("http://127.0.0.1:5000") == "MLflow UI: open http://127.0.0.1:5000 (then 'Model training')"


def test_closing_text_of_a_sweep_with_results_only_in_the_journal_says_incomplete_and_how_to_deliver():
    outcome = Outcome("abc", 10, 10, stage_seconds={"attack": 20.0},
                      tracking_uri="http://127.0.0.1:5000", log_dir="/o/logs", pending=4,
                      journal="/o/tracking-journal.jsonl")
    text = closing_text(outcome, 31.2, "sweeps/q.yaml")
    assert text.startswith("stopped after 31 s") and "done in" not in text and "TABLE" not in text
    assert ("INCOMPLETE: the MLflow store did not answer, so the results of 4 run(s) are not in MLflow yet; they are "
            "kept in /o/tracking-journal.jsonl") in text
    assert "sophon-ray sync sweeps/q.yaml" in text and "sophon-ray run sweeps/q.yaml --resume" in text


def test_environment_is_restored_after_the_block(monkeypatch):
    monkeypatch.setenv("SOPHON_TEST_KEPT", "before")
    monkeypatch.delenv("SOPHON_TEST_NEW", raising=False)
    with console.environment({"SOPHON_TEST_KEPT": "during", "SOPHON_TEST_NEW": "x"}):
        assert os.environ["SOPHON_TEST_KEPT"] == "during" and os.environ["SOPHON_TEST_NEW"] == "x"
    assert os.environ["SOPHON_TEST_KEPT"] == "before" and "SOPHON_TEST_NEW" not in os.environ


def test_a_stand_in_stream_logs_whole_lines_and_never_loops(tmp_path):
    real = io.StringIO()
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
            stand_in.write("written back by a handler\n")   # e.g. a handler bound to sys.stderr

    logger = logging.getLogger("stand-in-test")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    stand_in = console.StreamToLog(logger, real)
    stand_in.write("one\ntw")
    stand_in.write("o\n\n")
    assert records == ["one", "two"] and not stand_in.isatty()
    assert real.getvalue() == "written back by a handler\n" * 2


def test_a_failed_quiet_run_says_where_the_messages_are(tmp_path):
    text = failure_hint(tmp_path / "logs" / "sophon-ray.log", tmp_path / "logs" / "ray")
    assert f"{tmp_path}/logs/sophon-ray.log" in text and f"{tmp_path}/logs/ray" in text
    assert "--verbose" in text and "--resume" in text and "\n" not in text
