"""The trial mail: a light Ray actor (one per Tune run, on the driver's node) that holds what trials send besides
their scalar reports (per-epoch rows, artifacts) until the driver's MLflow callback takes them
(:mod:`sophon_ray.run.trials_worker` has the trials' side of it). Its own module imports neither torch nor numpy,
so the actor's worker process starts in a fraction of a trial process's time (torch's import is ~2.5 s of CPU
here, paid on the same cores as the trials' start)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)
MAIL_TIMEOUT_S = 60.0  # a trial waits at most this long for the mail actor to take its rows


class TrialMail:
    """Ray actor (one per Tune run, on the driver's node): trials' per-epoch rows and artifacts by Tune trial id,
    kept until the driver's callback takes them. Rows of a retried trial arrive again (the outbox logs each step
    once)."""

    def __init__(self) -> None:
        self.boxes: dict[str, tuple[list[dict[str, float]], dict[str, bytes]]] = {}

    def put(self, trial_id: str, rows: list[dict[str, float]], artifacts: dict[str, bytes]) -> None:
        box = self.boxes.setdefault(trial_id, ([], {}))
        box[0].extend(rows)
        box[1].update(artifacts)

    def take(self, trial_id: str) -> tuple[list[dict[str, float]], dict[str, bytes]]:
        return self.boxes.pop(trial_id, ([], {}))


def open_mail() -> Any:
    """A :class:`TrialMail` actor on this (the driver's) node, reserving no CPU."""
    import ray  # noqa: PLC0415
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: PLC0415

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, scheduling_strategy=here)(TrialMail).remote()


def close_mail(mail: Any) -> None:
    import ray  # noqa: PLC0415

    try:
        ray.kill(mail)
    except Exception as err:  # noqa: BLE001 - already gone: nothing to free
        log.debug("trial mail already gone: %s", err)


class MailReader:
    """The driver's side of a :class:`TrialMail` actor: ``take(trial_id)`` -> (rows, artifacts); a mail that
    does not answer gives nothing (logged), it never fails Tune's loop."""

    def __init__(self, mail: Any) -> None:
        self.mail = mail

    def take(self, trial_id: str) -> tuple[list[dict[str, float]], dict[str, bytes]]:
        import ray  # noqa: PLC0415

        try:
            return ray.get(self.mail.take.remote(trial_id), timeout=MAIL_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - a lost curve must not stop the sweep
            log.warning("trial %s: its rows could not be read from the trial mail: %r", trial_id, err)
            return [], {}


def mail_box(trial_id: str, member: str = "") -> str:
    """The mail box of a Tune trial, or of one ``member`` (its trial key) of a packed Tune trial."""
    return f"{trial_id}/{member}" if member else trial_id


def mail_sender(mail: Any, member: str = "") -> Callable[[list[dict[str, float]], dict[str, bytes]], None]:
    """The trial's side: send (rows, artifacts) to ``mail`` under this Tune trial's id (and ``member``'s key,
    :func:`mail_box`), waiting until it has them (so they are there before the report that follows)."""
    import ray  # noqa: PLC0415
    from ray import tune  # noqa: PLC0415

    trial_id = mail_box(tune.get_context().get_trial_id(), member)

    def send(rows: list[dict[str, float]], artifacts: dict[str, bytes]) -> None:
        try:
            ray.get(mail.put.remote(trial_id, rows, artifacts), timeout=MAIL_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the trial's scalars still reach Tune
            log.warning("trial %s: rows not sent to the trial mail: %r", trial_id, err)
    return send
