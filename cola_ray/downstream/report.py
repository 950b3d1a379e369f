"""The paper's Table 1 from MLflow: test accuracy per task and baseline, and their average.

Every probe and sweep parent run is tagged ``cola_ray.task`` and ``cola_ray.baseline``
(random init, supervised, COLA frozen, COLA fine-tuned) and carries ``test_accuracy``.
For each (task, baseline) the latest FINISHED such run is the cell (never the best of
several: that would select on test). Rows are tasks, columns the baselines present, in
the paper's order, and the last row is the average over tasks::

    r = report("cola-ray-downstream", "report/")
    print(r.markdown)       # also report/report.md, report.csv, report.png (with matplotlib)

The three files are logged as artifacts of a ``report`` run in the same experiment.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cola_ray.downstream.probe import BASELINE_TAG, BASELINES, KIND_TAG, TASK_TAG, matplotlib_available, open_tracking

AVERAGE = "Average"


@dataclass
class Cell:
    accuracy: float
    """Test accuracy in percent."""
    run_id: str
    kind: str
    """``probe`` or ``sweep``."""


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


def collect(client: Any, experiment_id: str) -> dict[tuple[str, str], Cell]:
    """The latest finished run with a test accuracy for every (task, baseline) in the experiment."""
    cells: dict[tuple[str, str], Cell] = {}
    token = None
    while True:
        page = client.search_runs([experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        for run in page:
            tags, metrics = run.data.tags, run.data.metrics
            task, baseline = tags.get(TASK_TAG), tags.get(BASELINE_TAG)
            if not task or not baseline or "test_accuracy" not in metrics:
                continue
            # Newest first: the first run seen for a cell is its latest.
            cells.setdefault((task, baseline), Cell(100.0 * metrics["test_accuracy"], run.info.run_id,
                                                    tags.get(KIND_TAG, "")))
        token = page.token
        if not token:
            return cells


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


def report(experiment: str, out_dir: str | Path = "report", tracking_uri: str = "") -> Report:
    """Build the table from ``experiment``'s runs, write it to ``out_dir`` and log it to MLflow.

    Writes ``report.md``, ``report.csv`` and (with matplotlib) ``report.png``, then logs
    them under ``report/`` in a new run tagged ``cola_ray.kind=report``. Raises
    ``ValueError`` naming the experiment if it is missing or holds no tagged run.
    """
    uri, client = open_tracking(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} at {uri}")
    cells = collect(client, exp.experiment_id)
    if not cells:
        raise ValueError(f"experiment {experiment!r} has no finished run tagged {TASK_TAG} and "
                         f"{BASELINE_TAG} with a test_accuracy (run `cola-ray probe` or `cola-ray sweep`)")
    r = build(cells)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(r.markdown)
    write_csv(r, out / "report.csv")
    r.files = {"markdown": str(out / "report.md"), "csv": str(out / "report.csv")}
    if plot(r, out / "report.png"):
        r.files["png"] = str(out / "report.png")

    run = client.create_run(exp.experiment_id, run_name=f"report-{time.strftime('%Y%m%d-%H%M%S')}",
                            tags={KIND_TAG: "report"})
    r.run_id = run.info.run_id
    for path in r.files.values():
        client.log_artifact(r.run_id, path, "report")
    for b, value in r.average.items():
        client.log_metric(r.run_id, "average/" + b.replace(" ", "_"), value)
    client.set_terminated(r.run_id, status="FINISHED")
    return r
