"""The paper's Table 1 from MLflow: test accuracy per task and baseline, and their average.

Every probe and sweep parent run is tagged ``cola_ray.task`` and ``cola_ray.baseline``
(random init, supervised, COLA frozen, COLA fine-tuned) and carries ``test_accuracy``.
For each (task, baseline) the latest FINISHED such run is the cell (never the best of
several: that would select on test). Rows are tasks, columns the baselines present, in
the paper's order, and the last row is the average over tasks::

    r = report("cola-ray-downstream", "report/")
    print(r.markdown)       # also report/report.md, report.csv, report.png (with matplotlib)

Runs that measured a pre-training run carry its id (``cola_ray.pretrain.run_id``, see
:mod:`cola_ray.downstream.encoders`): the markdown then has one table per pre-training run,
each with the baselines that measured none (log-mel, random init, supervised) beside it.
Two more plots: ``pretraining.png``, the loss and contrastive accuracy of those
pre-training runs side by side (their MLflow metric histories), and ``accuracy_vs_step.png``,
downstream test accuracy against the pre-training step of the checkpoint (probes of
several checkpoints, ``cola_ray.pretrain.step``) with the pre-training run's online
evaluation (``eval/<task>/accuracy``) as lines.

The files are logged as artifacts of a ``report`` run in the same experiment.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_ray.downstream.probe import BASELINE_TAG, BASELINES, KIND_TAG, TASK_TAG, matplotlib_available, open_tracking
from cola_ray.downstream.tags import (CHECKPOINT_STEP_TAG, PRETRAIN_EXPERIMENT_TAG, PRETRAIN_RUN_NAME_TAG,
                                      PRETRAIN_RUN_TAG)

AVERAGE = "Average"
PRETRAIN_METRICS = ("loss", "contrastive_accuracy")
"""The pre-training curves plotted side by side (cola_ray.train.loop logs them every log step)."""
NO_PRETRAINING = ("log-mel", "random init", "supervised")
"""Baselines that measure no pre-training run: compared with every pre-training run's column."""
PRETRAIN_RUNS_TAG = "cola_ray.pretrain.run_ids"
"""On a report of several pre-training runs: their ids, comma-separated."""


@dataclass
class Cell:
    accuracy: float
    """Test accuracy in percent."""
    run_id: str
    kind: str
    """``probe`` or ``sweep``."""
    pretrain_run_id: str = ""
    """The pre-training run the cell measured ('' for baselines that measured none)."""
    step: str = ""
    """The pre-training step of the checkpoint measured ('' when unknown or none)."""


@dataclass
class Report:
    tasks: list[str]
    baselines: list[str]
    cells: dict[tuple[str, str], Cell]
    average: dict[str, float]
    """Baseline -> mean over the tasks that have a cell for it (percent)."""
    markdown: str
    files: dict[str, str] = field(default_factory=dict)
    run_id: str = ""
    groups: dict[str, "Report"] = field(default_factory=dict)
    """Pre-training run id -> its table (with the baselines that measured no pre-training run)."""
    names: dict[str, str] = field(default_factory=dict)
    """Pre-training run id -> its run name (as tagged on the downstream runs)."""


def measured_runs(client: Any, experiment_id: str) -> list[Any]:
    """The experiment's finished runs with a task, a baseline and a test accuracy, newest first."""
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs += [r for r in page if r.data.tags.get(TASK_TAG) and r.data.tags.get(BASELINE_TAG)
                 and "test_accuracy" in r.data.metrics]
        token = page.token
        if not token:
            return runs


def _cell(run: Any) -> Cell:
    tags = run.data.tags
    return Cell(100.0 * run.data.metrics["test_accuracy"], run.info.run_id, tags.get(KIND_TAG, ""),
                tags.get(PRETRAIN_RUN_TAG, ""), tags.get(CHECKPOINT_STEP_TAG, ""))


def collect(client: Any, experiment_id: str) -> dict[tuple[str, str], Cell]:
    """The latest finished run with a test accuracy for every (task, baseline) in the experiment."""
    return latest_cells(measured_runs(client, experiment_id))


def latest_cells(runs: list[Any]) -> dict[tuple[str, str], Cell]:
    """(task, baseline) -> the cell of the latest of ``runs`` (newest first) for it."""
    cells: dict[tuple[str, str], Cell] = {}
    for run in runs:  # newest first: the first seen is a cell's latest
        cells.setdefault((run.data.tags[TASK_TAG], run.data.tags[BASELINE_TAG]), _cell(run))
    return cells


def collect_groups(runs: list[Any]) -> dict[str, dict[tuple[str, str], Cell]]:
    """Pre-training run id ('' for none) -> the latest cell of each (task, baseline) measuring it."""
    groups: dict[str, dict[tuple[str, str], Cell]] = {}
    for run in runs:
        cell = _cell(run)
        groups.setdefault(cell.pretrain_run_id, {}).setdefault(
            (run.data.tags[TASK_TAG], run.data.tags[BASELINE_TAG]), cell)
    return groups


def grouped(cells: dict[tuple[str, str], Cell], groups: dict[str, dict[tuple[str, str], Cell]],
            names: dict[str, str]) -> Report:
    """The overall table, with one table per pre-training run in its markdown when there are any.

    Each pre-training run's table holds its own cells and, where it has none, the cells of
    the runs that measured no pre-training run (the baselines every encoder is compared to).
    """
    r = build(cells)
    shared = {k: c for k, c in groups.get("", {}).items() if k[1] in NO_PRETRAINING}
    r.names = dict(names)
    r.groups = {pid: build({**shared, **own}) for pid, own in sorted(groups.items(), key=lambda g: names.get(g[0], g[0]))
                if pid}
    if r.groups:
        parts = []
        for pid, g in r.groups.items():
            steps = sorted({c.step for c in groups[pid].values() if c.step},
                           key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))
            at = f", checkpoint step {', '.join(steps)}" if steps else ""
            parts.append(f"## Pre-training run {names.get(pid) or pid} (`{pid}`{at})\n\n{g.markdown}")
        if len(shared) < len(groups.get("", {})):  # e.g. runs from before runs were tagged
            parts.append(f"## Runs that name no pre-training run\n\n{build(groups['']).markdown}")
        r.markdown = "\n".join(parts)
    return r


def build(cells: dict[tuple[str, str], Cell]) -> Report:
    """Arrange cells as the paper's table (no I/O)."""
    tasks = sorted({t for t, _ in cells})
    present = {b for _, b in cells}
    baselines = [b for b in BASELINES if b in present] + sorted(present - set(BASELINES))
    average = {}
    for b in baselines:
        values = [cells[t, b].accuracy for t in tasks if (t, b) in cells]
        average[b] = sum(values) / len(values)
    report = Report(tasks, baselines, cells, average, "")
    report.markdown = to_markdown(report)
    return report


def to_markdown(r: Report) -> str:
    lines = ["| task | " + " | ".join(r.baselines) + " |", "|---|" + "---|" * len(r.baselines)]
    for t in r.tasks:
        row = [f"{r.cells[t, b].accuracy:.1f}" if (t, b) in r.cells else "–" for b in r.baselines]
        lines.append(f"| {t} | " + " | ".join(row) + " |")
    avg = []
    for b in r.baselines:
        n = sum((t, b) in r.cells for t in r.tasks)
        avg.append(f"{r.average[b]:.1f}" + ("" if n == len(r.tasks) else f" ({n}/{len(r.tasks)} tasks)"))
    lines.append(f"| **{AVERAGE}** | " + " | ".join(avg) + " |")
    lines += ["", "Test accuracy (%), clip level. Source runs:", ""]
    for (t, b), c in sorted(r.cells.items()):
        lines.append(f"- {t} / {b}: {c.kind} run `{c.run_id}`")
    return "\n".join(lines) + "\n"


def write_csv(r: Report, path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", *r.baselines])
        for t in r.tasks:
            writer.writerow([t, *(f"{r.cells[t, b].accuracy:.2f}" if (t, b) in r.cells else "" for b in r.baselines)])
        writer.writerow([AVERAGE, *(f"{r.average[b]:.2f}" for b in r.baselines)])


def plot(r: Report, path: Path) -> bool:
    """Grouped bars: one group per task (and the average), one bar per baseline."""
    if not matplotlib_available():
        return False
    from matplotlib.figure import Figure  # the object API: no pyplot, no global backend

    groups = [*r.tasks, AVERAGE]
    width = 0.8 / max(1, len(r.baselines))
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) + 2), 4.5))
    ax = fig.add_subplot()
    for i, b in enumerate(r.baselines):
        values = [r.cells[t, b].accuracy if (t, b) in r.cells else 0.0 for t in r.tasks] + [r.average[b]]
        ax.bar([g + (i - (len(r.baselines) - 1) / 2) * width for g in range(len(groups))], values, width, label=b)
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def pretraining_curves(client: Any, run_ids: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Metric -> run id -> ``[(step, value), ...]`` of :data:`PRETRAIN_METRICS` (runs this store lacks left out)."""
    from mlflow.exceptions import MlflowException

    curves: dict[str, dict[str, list[tuple[int, float]]]] = {m: {} for m in PRETRAIN_METRICS}
    for run_id in run_ids:
        for metric in PRETRAIN_METRICS:
            try:
                history = client.get_metric_history(run_id, metric)
            except MlflowException:
                continue
            if history:
                curves[metric][run_id] = sorted((m.step, m.value) for m in history)
    return curves


def accuracy_by_step(client: Any, runs: list[Any], run_ids: list[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Task -> series label -> ``[(pre-training step, test accuracy %), ...]``.

    Series: the downstream runs of each (pre-training run, baseline) at their checkpoint's
    step (the latest run per step), and each pre-training run's online evaluation
    (``eval/<task>/accuracy``, logged at steps).
    """
    from mlflow.exceptions import MlflowException

    points: dict[str, dict[str, dict[int, float]]] = {}
    names: dict[str, str] = {}
    for run in runs:  # newest first: the first run seen at a step is its latest
        tags = run.data.tags
        pid, step = tags.get(PRETRAIN_RUN_TAG, ""), tags.get(CHECKPOINT_STEP_TAG, "")
        if not pid or not step.isdigit():
            continue
        names.setdefault(pid, tags.get(PRETRAIN_RUN_NAME_TAG) or pid[:8])
        label = f"{names[pid]} · {tags[BASELINE_TAG]}"
        points.setdefault(tags[TASK_TAG], {}).setdefault(label, {}).setdefault(
            int(step), 100.0 * run.data.metrics["test_accuracy"])
    for pid in run_ids:
        try:
            run = client.get_run(pid)
        except MlflowException:
            continue
        name = names.get(pid) or run.info.run_name or pid[:8]
        for key in run.data.metrics:
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "accuracy":
                series = points.setdefault(parts[1], {}).setdefault(f"{name} · online eval", {})
                for m in client.get_metric_history(pid, key):
                    series[m.step] = 100.0 * m.value
    return {task: {label: sorted(p.items()) for label, p in sorted(s.items())} for task, s in sorted(points.items())}


def plot_pretraining(curves: dict[str, dict[str, list[tuple[int, float]]]], names: dict[str, str], path: Path) -> bool:
    """Loss and contrastive accuracy of every pre-training run, side by side; False if nothing to draw."""
    if not matplotlib_available() or not any(curves.values()):
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    for i, (metric, ylabel) in enumerate((("loss", "contrastive loss"),
                                          ("contrastive_accuracy", "contrastive accuracy (%)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        scale = 100.0 if metric == "contrastive_accuracy" else 1.0
        for run_id, points in curves.get(metric, {}).items():
            ax.plot([s for s, _ in points], [scale * v for _, v in points], label=names.get(run_id) or run_id[:8])
        ax.set_xlabel("pre-training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if curves.get(metric):
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def plot_accuracy_by_step(points: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> bool:
    """One panel per task: test accuracy against the checkpoint's pre-training step; False if empty."""
    if not matplotlib_available() or not points:
        return False
    from matplotlib.figure import Figure

    cols = min(3, len(points))
    rows = -(-len(points) // cols)
    fig = Figure(figsize=(4.5 * cols + 1, 3.8 * rows))
    colours: dict[str, str] = {}  # one colour per pre-training run; its online evaluation dashed
    for i, (task, series) in enumerate(points.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for label, xy in series.items():
            online = label.endswith("online eval")
            colour = colours.setdefault(label.split(" · ")[0], f"C{len(colours) % 10}")
            ax.plot([x for x, _ in xy], [y for _, y in xy], "--" if online else "o-", color=colour, label=label)
        ax.set_title(task)
        ax.set_xlabel("pre-training step")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def report(experiment: str, out_dir: str | Path = "report", tracking_uri: str = "") -> Report:
    """Build the table from ``experiment``'s runs, write it to ``out_dir`` and log it to MLflow.

    Writes ``report.md`` (one table per pre-training run when runs name one), ``report.csv``
    (the overall table) and the plots ``report.png``, ``pretraining.png`` and
    ``accuracy_vs_step.png`` (each when there is something to draw), then logs them under
    ``report/`` in a new run tagged ``cola_ray.kind=report`` (and with the pre-training run
    when the report measures exactly one). Raises
    ``ValueError`` naming the experiment if it is missing or holds no tagged run.
    """
    uri, client = open_tracking(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    runs = measured_runs(client, exp.experiment_id)
    if not runs:
        raise ValueError(f"experiment {experiment!r} has no finished run tagged {TASK_TAG} and "
                         f"{BASELINE_TAG} with a test_accuracy (run `cola-ray probe` or `cola-ray sweep`)")
    groups = collect_groups(runs)
    names = {}
    for run in reversed(runs):  # the newest name given to a pre-training run wins
        pid = run.data.tags.get(PRETRAIN_RUN_TAG)
        if pid:
            names[pid] = run.data.tags.get(PRETRAIN_RUN_NAME_TAG) or names.get(pid, "")
    r = grouped(latest_cells(runs), groups, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(r.markdown)
    write_csv(r, out / "report.csv")
    r.files = {"markdown": str(out / "report.md"), "csv": str(out / "report.csv")}
    if plot(r, out / "report.png"):
        r.files["png"] = str(out / "report.png")
    pretrained = list(r.groups)
    if plot_pretraining(pretraining_curves(client, pretrained), names, out / "pretraining.png"):
        r.files["pretraining_png"] = str(out / "pretraining.png")
    if plot_accuracy_by_step(accuracy_by_step(client, runs, pretrained), out / "accuracy_vs_step.png"):
        r.files["accuracy_vs_step_png"] = str(out / "accuracy_vs_step.png")

    tags = {KIND_TAG: "report"}
    if len(pretrained) == 1:  # a report of one pre-training run names it as every downstream run does
        tags[PRETRAIN_RUN_TAG] = pretrained[0]
        if names.get(pretrained[0]):
            tags[PRETRAIN_RUN_NAME_TAG] = names[pretrained[0]]
        experiments = {r2.data.tags.get(PRETRAIN_EXPERIMENT_TAG) for r2 in runs
                       if r2.data.tags.get(PRETRAIN_RUN_TAG) == pretrained[0]} - {None, ""}
        if len(experiments) == 1:
            tags[PRETRAIN_EXPERIMENT_TAG] = experiments.pop()
    elif pretrained:
        tags[PRETRAIN_RUNS_TAG] = ",".join(pretrained)[:5000]
    run = client.create_run(exp.experiment_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}", tags=tags)
    r.run_id = run.info.run_id
    for path in r.files.values():
        client.log_artifact(r.run_id, path, "report")
    for b, value in r.average.items():
        client.log_metric(r.run_id, "average/" + b.replace(" ", "_"), value)
    client.set_terminated(r.run_id, status="FINISHED")
    return r
