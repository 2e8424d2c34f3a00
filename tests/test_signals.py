"""SIGTERM and Ctrl-C to the driver stop the sweep cleanly: exit 143 / 130, a message that says what finished and the
``--resume`` command, nothing lost (the resumed sweep ends with every trial's MLflow run once, every epoch once); a
second signal exits at once without tearing the tracking journal. Real processes and real signals."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sophon_ray.console.signals import Interrupted, claim, exit_code, received, stopping
from tests.procenv import process_env
from tests.test_faults import (assert_complete, attack_runs, kill_sessions, seed_models, session_processes,
                               spec_for, wait_for_store)
from tests.test_faults_protect import assert_history_once, protect_run, protect_spec, state_checkpoints, \
    wait_for_state_checkpoint

OVERRIDE = "resources.max_failures=2"  # not part of the sweep's id: the resumed run is the same sweep
CRASH_MARKS = ("stopped on an error", "Traceback", "*** SIGTERM received", "*** Aborted", "Stack trace",
               "core dumped", "Received SIGINT")  # Ray's C++ stack dump, Ray Train's own SIGINT handler


# ----------------------------------------------------------------------------------------------- the handler itself


def test_the_first_signal_raises_interrupted_and_the_handlers_are_put_back_after_the_block():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as stop:
        with stopping() as stopper:
            signal.signal(signal.SIGTERM, lambda *_: None)  # a library replaces it (ray.init does) ...
            claim()                                         # ... and the run takes it back
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at once, in this (the main) thread
    assert stop.value.signum == signal.SIGTERM and stop.value.exit_code == 143 == exit_code(signal.SIGTERM)
    assert stopper.signum == signal.SIGTERM and received() == 0  # outside the block: none
    assert signal.getsignal(signal.SIGTERM) == before
    assert exit_code(signal.SIGINT) == 130


# A child that appends to a real outbox journal in its main thread without pause, before and during its clean stop,
# until the second signal ends it: os._exit at any point must leave only whole JSON lines.
JOURNAL_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from sophon_ray.console.signals import Interrupted, fd_notice, stopping
    from sophon_ray.run.outbox import Outbox

    outbox = Outbox(None, Path(sys.argv[1]))
    blob = b"x" * 20000  # an artifact op: one line larger than a file buffer

    def write(n):
        outbox.open(f"t{n}", "parent", "sweep", f"trial {n}", {"lr": 0.001})
        outbox.rows(f"t{n}", [(step, {"acc": 0.5}) for step in range(5)])
        outbox.artifact(f"t{n}", "curve.png", blob)
        outbox.finish(f"t{n}", "FINISHED")

    with stopping(fd_notice(sys.stdout)):
        n = 0
        try:
            while True:
                write(n)
                n += 1
                if n == 20:
                    print("ready", flush=True)
        except Interrupted:
            print("stopping", flush=True)
            while True:  # a stop that takes long: the second signal must end it at once
                write(n)
                n += 1
""")


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT)])
def test_a_second_signal_during_the_stop_exits_at_once_with_a_journal_of_whole_lines(tmp_path, first, second):
    journal = tmp_path / "journal.jsonl"
    proc = subprocess.Popen([sys.executable, "-c", JOURNAL_CHILD, str(journal)], env=process_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(first)
        said = [proc.stdout.readline().strip() for _ in range(2)]
        assert "stopping the sweep cleanly" in said[0] and said[1] == "stopping", said
        time.sleep(0.3)
        sent = time.monotonic()
        proc.send_signal(second)
        assert proc.wait(timeout=10) == exit_code(second)
        assert time.monotonic() - sent < 5
        rest = proc.stdout.read()
        assert "again: exiting now" in rest, rest
    finally:
        proc.kill()
        proc.wait()
    lines = journal.read_text().splitlines()
    assert len(lines) > 80
    for line in lines:
        json.loads(line)  # every line whole


# --------------------------------------------------------------------------------------------- real sweeps


STARTED: list[int] = []  # process sessions this module started: whatever a failed test leaves is ended by `ended`


def start(tmp: Path, *args: str) -> subprocess.Popen:
    """``sophon-ray ARGS`` in its own process session, with SIGINT's default disposition (a test run started in the
    background hands its children SIGINT ignored), output appended to ``tmp/stdout.log``."""
    proc = subprocess.Popen([sys.executable, "-m", "sophon_ray.cli", *args], cwd=tmp, env=process_env(), text=True,
                            stdout=open(tmp / "stdout.log", "a"), stderr=subprocess.STDOUT, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    STARTED.append(proc.pid)
    return proc


@pytest.fixture
def ended():
    """After the test, pass or fail: SIGKILL every process of the sessions it started (never another test's)."""
    yield
    kill_sessions(STARTED)
    STARTED.clear()


STOP_S = 60  # the most a clean stop may take, signal to exit (measured: see the report of issue 25)


def stopped(tmp: Path, proc: subprocess.Popen, code: int, sent: float) -> str:
    """The driver's output once it exited with ``code`` within STOP_S of the signal (``sent``, monotonic); then no
    process of its session (its Ray instance) is left."""
    try:
        status = proc.wait(timeout=120)
        took = time.monotonic() - sent
    finally:
        output = (tmp / "stdout.log").read_text()
    assert status == code, output[-4000:]
    print(f"signal to exit: {took:.1f} s")
    assert took < STOP_S, (took, output[-4000:])
    deadline = time.monotonic() + 30
    while session_processes(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    left = session_processes(proc.pid)
    kill_sessions([proc.pid])
    assert not left, [" ".join(p.cmdline()[:3]) for p in left if p.is_running()]
    for mark in CRASH_MARKS:
        assert mark not in output, (mark, output[-4000:])
    return output


def resume(tmp: Path, output: str, expected: str) -> None:
    """Run the command the stopped run printed (``sophon-ray`` as this interpreter's module); it must be
    ``expected`` and exit 0."""
    command = re.findall(r"continue the sweep with: (.+)", output)[-1]
    assert command == expected, command
    words = shlex.split(command)
    assert words[0] == "sophon-ray"
    proc = start(tmp, *words[1:])
    assert proc.wait(timeout=400) == 0, (tmp / "stdout.log").read_text()[-4000:]


def parent_status(uri: str, experiment: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("sophon.role") == "sweep"]
    assert len(runs) == 1
    return runs[0].info.status


@pytest.mark.slow
@pytest.mark.usefixtures("ended")
def test_sigterm_during_the_attack_grid_stops_cleanly_and_the_printed_resume_finishes_it(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = spec_for(tmp_path, "termgrid", ["direct-all", "initfc-all"], ["sgd", "adam"])  # 4 + 2 scratch trials
    seed_models(spec)
    proc = start(tmp_path, "run", str(spec), "--set", OVERRIDE)
    wait_for_store(tmp_path, proc)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # mid-grid: one trial finished, others running
        if [r for r in attack_runs(uri, "termgrid") if r.info.status == "FINISHED"]:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # to the driver only, as `kill PID` or a scheduler does
    output = stopped(tmp_path, proc, 143, time.monotonic())
    assert "stopped by SIGTERM" in output and "during the attack grid" in output, output[-3000:]
    finished = int(re.search(r"attack grid: (\d+) of 6 trials finished", output)[1])
    assert 1 <= finished < 6, output[-3000:]
    assert "every result is in MLflow" in output, output[-3000:]
    done = {r.data.tags["sophon.key"]: (r.info.run_id, r.info.end_time)
            for r in attack_runs(uri, "termgrid") if r.info.status == "FINISHED"}
    assert len(done) == finished  # what the message says is what MLflow holds
    assert parent_status(uri, "termgrid") == "KILLED"

    resume(tmp_path, output, f"sophon-ray run {spec} --set {OVERRIDE} --resume")
    runs = assert_complete(uri, "termgrid", expected=6)
    after = {r.data.tags["sophon.key"]: (r.info.run_id, r.info.end_time) for r in runs}
    assert all(after[k] == v for k, v in done.items()), "a trial finished before the stop was rerun"
    assert f"attack grid: 6 trials, {finished} finished earlier" in (tmp_path / "stdout.log").read_text()
    assert parent_status(uri, "termgrid") == "FINISHED"


@pytest.mark.slow
@pytest.mark.usefixtures("ended")
def test_ctrl_c_during_protection_stops_cleanly_and_the_printed_resume_continues_the_protection(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    spec = protect_spec(tmp_path, "intprotect")
    proc = start(tmp_path, "run", str(spec))
    wait_for_store(tmp_path, proc)
    wait_for_state_checkpoint(tmp_path, proc)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the terminal sends it to the foreground process group
    output = stopped(tmp_path, proc, 130, time.monotonic())
    assert "stopped by Ctrl-C (SIGINT)" in output and "during pretraining and protection" in output, output[-3000:]
    assert re.search(r"models: [01] of 2 stored \(--resume continues a protection", output), output[-3000:]
    last = state_checkpoints(tmp_path)[-1]
    assert last < 50 and not list((tmp_path / "out" / "checkpoints").glob("protect-*"))
    assert parent_status(uri, "intprotect") == "KILLED"

    resume(tmp_path, output, f"sophon-ray run {spec} --resume")
    client, run = protect_run(uri, "intprotect")
    assert run.data.metrics["resumed_from_iteration"] == last  # continued from the state checkpoint, not from 0
    assert_history_once(client, run)
    assert [r.info.status for r in attack_runs(uri, "intprotect")] == ["FINISHED"]  # its one attack trial
    assert parent_status(uri, "intprotect") == "FINISHED"


def test_the_resume_command_repeats_the_subcommand_spec_overrides_checkpoint_and_address():
    from sophon_ray.cli import _resume_command, build_parser

    args = build_parser().parse_args(["attack", "my spec.yaml", "--set", "a.b=1 2", "--checkpoint", "ck",
                                      "--address", "h:6379"])
    assert _resume_command(args) == ("sophon-ray attack 'my spec.yaml' --set 'a.b=1 2' --checkpoint ck "
                                     "--address h:6379 --resume")
    assert _resume_command(build_parser().parse_args(["protect", "s.yaml"])) == "sophon-ray protect s.yaml --resume"


def test_the_stop_message_says_the_stage_what_finished_the_journal_and_the_command():
    from sophon_ray.run.context import Outcome
    from sophon_ray.run.texts import stopped_text

    outcome = Outcome("sid", 12, stage="attack", grid_total=12, grid_finished=5, models_planned=3, models_ready=3,
                      pending=2, journal="/o/tracking-journal.jsonl", log_dir="/o/logs")
    text = stopped_text(outcome, "SIGTERM", 65, "sophon-ray run s.yaml --resume")
    assert text.splitlines()[0] == "stopped by SIGTERM after 1m05s, during the attack grid (Ray Tune); what finished is kept:"
    for part in ("models: 3 of 3 stored", "attack grid: 5 of 12 trials finished", "2 trial(s) with results not yet in "
                 "MLflow, kept in /o/tracking-journal.jsonl", "continue the sweep with: sophon-ray run s.yaml --resume",
                 "logs: /o/logs"):
        assert part in text, (part, text)
    early = stopped_text(None, "Ctrl-C (SIGINT)", 3, "sophon-ray run s.yaml --resume")
    assert "with no stage running" in early and early.endswith("continue the sweep with: sophon-ray run s.yaml --resume")


def test_ray_train_still_has_the_sigint_handler_the_driver_keeps_out():
    """The slow Ctrl-C test needs Ray Train's SIGINT handler kept out; a Ray release that renames its hook fails here,
    in CI's fast tests."""
    from ray.train.torch import TorchTrainer

    from sophon_ray.run.train_driver import _without_sigint_handler

    assert callable(getattr(TorchTrainer, "_register_sigint_handler", None))
    trainer = _without_sigint_handler(TorchTrainer)
    assert issubclass(trainer, TorchTrainer) and trainer._register_sigint_handler(object(), None) is None


def test_model_jobs_names_every_model_its_folder_and_job(tmp_path):
    """The one list of models the train stage trains and a stopped run counts: the normal model, each variant x seed
    (keyed as the trials' subjects name them), or an audited checkpoint as it is, with no job."""
    from sophon_ray.run.keys import pretrain_key, protect_key
    from sophon_ray.run.train_driver import jobs_dir, model_jobs
    from sophon_ray.run.validate import load_spec

    spec = load_spec("sweeps/quickstart.yaml")
    store = tmp_path / "checkpoints"
    planned = model_jobs(spec, store)
    normal_dir, normal_job = planned.pop("normal")
    assert normal_dir == store / jobs_dir("pretrain", "normal", pretrain_key(spec)) and normal_job.stage == "pretrain"
    expected = {f"protected/{v.label}/s{seed}": protect_key(spec, i, seed)
                for i, v in enumerate(spec.protect) for seed in v.seeds}
    assert set(planned) == set(expected) and len(expected) >= 1
    for key, (folder, job) in planned.items():
        assert job.stage == "protect" and job.key == expected[key] and folder == store / jobs_dir("protect", job.label,
                                                                                                   job.key)
    from sophon_ray import names

    audited = model_jobs(spec, store, Path("given"))
    assert list(audited) == ["normal", f"protected/audited/s{names.NO_PROTECT_SEED}"]
    assert audited[f"protected/audited/s{names.NO_PROTECT_SEED}"] == (Path("given").resolve(), None)
