"""The pre-training run's description in MLflow lists the downstream runs that measured it.

Every downstream run is tagged with its pre-training run (:class:`cola_ray.downstream.encoders.Lineage`).
When one finishes, :func:`note_finished` rewrites one section of the pre-training run's
``mlflow.note.content`` (the markdown the MLflow UI shows as its description) from a search
of the runs tagged with that run id, so two downstream runs finishing at once cannot lose
each other's line: each rewrites the whole list from the store, then reads it back and
rewrites again if a run that finished meanwhile is missing. Text outside the section is kept.
"""

from __future__ import annotations

import random
import time
import warnings
from typing import Any

from cola_ray.downstream.tags import (BASELINE_TAG, CHECKPOINT_STEP_TAG, KIND_TAG, NOTE_TAG, PRETRAIN_RUN_TAG,
                                      TASK_TAG)

BEGIN = "<!-- cola-ray: downstream runs (rewritten by cola-ray; edit outside this block) -->"
END = "<!-- cola-ray: end of downstream runs -->"
LISTED_KINDS = ("probe", "sweep", "finetune")
"""Runs with a headline result; sweep trials and reports are left out of the note."""
ATTEMPTS = 6


def run_link(experiment_id: str, run_id: str) -> str:
    """The MLflow UI's address of a run, relative to the UI (works in a run's note)."""
    return f"#/experiments/{experiment_id}/runs/{run_id}"


def downstream_runs(client: Any, pretrain_run_id: str) -> list[Any]:
    """Every run of every experiment tagged with ``pretrain_run_id``, oldest first."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs: list[Any] = []
    for i in range(0, len(experiments), 100):  # search_runs takes a bounded list of experiments
        token = None
        while True:
            page = client.search_runs(experiments[i:i + 100],
                                      filter_string=f"tags.`{PRETRAIN_RUN_TAG}` = '{pretrain_run_id}'",
                                      order_by=["attributes.start_time ASC"], max_results=1000, page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                break
    return [r for r in runs if r.data.tags.get(KIND_TAG) in LISTED_KINDS]


def render(runs: list[Any]) -> str:
    """The note's section: one table row per downstream run, with a link to it."""
    lines = [BEGIN, "### Downstream runs", ""]
    if not runs:
        lines.append("None yet.")
    else:
        lines += ["| run | kind | task | baseline | step | status | val acc | test acc |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in runs:
            tags, metrics = r.data.tags, r.data.metrics
            acc = {k: f"{100 * metrics[k]:.1f}%" if k in metrics else "–" for k in ("val_accuracy", "test_accuracy")}
            lines.append(f"| [{r.info.run_name or r.info.run_id}]({run_link(r.info.experiment_id, r.info.run_id)}) "
                         f"| {tags.get(KIND_TAG, '')} | {tags.get(TASK_TAG, '')} | {tags.get(BASELINE_TAG, '')} "
                         f"| {tags.get(CHECKPOINT_STEP_TAG, '–')} | {r.info.status} "
                         f"| {acc['val_accuracy']} | {acc['test_accuracy']} |")
    return "\n".join([*lines, END])


def replace_section(note: str, section: str) -> str:
    """``note`` with its downstream section replaced by ``section`` (appended when absent)."""
    start, end = note.find(BEGIN), note.find(END)
    if start >= 0 and end > start:
        return note[:start] + section + note[end + len(END):]
    return (note.rstrip() + "\n\n" if note.strip() else "") + section + "\n"


def update_note(client: Any, pretrain_run_id: str) -> str:
    """Rewrite the pre-training run's downstream section from the store; returns the note.

    Writers race: two runs finishing at once both write the tag, and a sqlite store refuses
    one of two first inserts of a tag (IntegrityError) or a write while another holds the
    lock. A refused write is retried after a jittered wait, like a write that lost its race.
    """
    error: Exception | None = None
    for attempt in range(ATTEMPTS):
        try:
            section = render(downstream_runs(client, pretrain_run_id))
            note = client.get_run(pretrain_run_id).data.tags.get(NOTE_TAG, "")
            if section in note:
                return note
            client.set_tag(pretrain_run_id, NOTE_TAG, replace_section(note, section))
            error = None
            # Then read back: another process may have written an older list after this one.
        except Exception as e:  # noqa: BLE001 - the store's refusal is retried, then raised
            error = e
            time.sleep(random.uniform(0.05, 0.25) * (attempt + 1))  # a refused writer backs off
    if error is not None:
        raise error
    return client.get_run(pretrain_run_id).data.tags.get(NOTE_TAG, "")


def note_finished(client: Any, run_id: str) -> None:
    """After downstream run ``run_id`` ended: update its pre-training run's note, if it has one.

    Never raises: a note that cannot be written (no such run in this store, a server
    refusing) is a warning, and the downstream run's result stands.
    """
    try:
        pretrain = client.get_run(run_id).data.tags.get(PRETRAIN_RUN_TAG, "")
        if pretrain:
            update_note(client, pretrain)
    except Exception as e:  # noqa: BLE001 - the note is a convenience, the run's result is not
        warnings.warn(f"could not list run {run_id} on its pre-training run's MLflow note: "
                      f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
