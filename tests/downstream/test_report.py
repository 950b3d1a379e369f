"""The report table from cells, and from a real MLflow store (sqlite) made directly: grouped
by pre-training run, with its plots (a report of real sweeps is in test_sweep.py)."""

from __future__ import annotations

import csv

import pytest

from cola_ray.downstream.report import Cell, build, write_csv


def test_table_has_the_papers_columns_and_an_average_over_tasks(tmp_path):
    cells = {
        ("speech_commands_v1", "COLA frozen"): Cell(71.7, "r1", "sweep"),
        ("speech_commands_v1", "random init"): Cell(62.9, "r2", "probe"),
        ("musan", "COLA frozen"): Cell(99.1, "r3", "probe"),
        ("musan", "my-new-baseline"): Cell(50.0, "r4", "probe"),
    }
    r = build(cells)
    assert r.tasks == ["musan", "speech_commands_v1"]
    assert r.baselines == ["random init", "COLA frozen", "my-new-baseline"]  # the paper's order, then others
    assert r.average["COLA frozen"] == pytest.approx((71.7 + 99.1) / 2)
    lines = r.markdown.splitlines()
    assert lines[0] == "| task | random init | COLA frozen | my-new-baseline |"
    assert lines[2] == "| musan | – | 99.1 | 50.0 |"
    assert lines[3] == "| speech_commands_v1 | 62.9 | 71.7 | – |"
    assert lines[4] == "| **Average** | 62.9 (1/2 tasks) | 85.4 | 50.0 (1/2 tasks) |"
    assert "- musan / COLA frozen: probe run `r3`" in r.markdown

    write_csv(r, tmp_path / "t.csv")
    rows = list(csv.reader(open(tmp_path / "t.csv")))
    assert rows[1] == ["musan", "", "99.10", "50.00"]
    assert rows[-1] == ["Average", "62.90", "85.40", "50.00"]


# ---- from a real MLflow store (sqlite): grouped by pre-training run, and the plots ----------

PNG = b"\x89PNG\r\n\x1a\n"


def is_png(path, min_bytes=5000) -> bool:
    data = open(path, "rb").read()
    return data.startswith(PNG) and len(data) >= min_bytes


@pytest.fixture
def two_pretrainings(tmp_path):
    """Two pre-training runs with loss / accuracy curves and online evaluation, probes of
    their checkpoints at several steps, and a log-mel baseline that measured neither."""
    from mlflow.tracking import MlflowClient

    from cola_ray.downstream.encoders import Lineage
    from cola_ray.downstream.tags import BASELINE_TAG, KIND_TAG, TASK_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    pre_exp, down_exp = client.create_experiment("test-pretrain"), client.create_experiment("test-downstream")
    pre = {}
    for name, slope in (("cola-a", 1.0), ("cola-b", 2.0)):
        run_id = client.create_run(pre_exp, run_name=name).info.run_id
        for step in range(0, 301, 10):
            client.log_metric(run_id, "loss", 5.0 / (1 + slope * step / 100), step=step)
            client.log_metric(run_id, "contrastive_accuracy", min(1.0, slope * step / 400), step=step)
        for step in (100, 200, 300):
            client.log_metric(run_id, "eval/toy/accuracy", min(1.0, 0.3 + slope * step / 1000), step=step)
        pre[name] = run_id

    def downstream(baseline, acc, lineage):
        tags = {KIND_TAG: "probe", TASK_TAG: "toy", BASELINE_TAG: baseline, **lineage.tags()}
        run_id = client.create_run(down_exp, run_name=f"probe-{baseline}", tags=tags).info.run_id
        client.log_metric(run_id, "test_accuracy", acc)
        client.set_terminated(run_id)

    downstream("log-mel", 0.40, Lineage("logmel", "features"))
    for name, step, acc in (("cola-a", 100, 0.50), ("cola-a", 200, 0.60), ("cola-a", 300, 0.70), ("cola-b", 300, 0.80)):
        downstream("COLA frozen", acc, Lineage(f"runs/{name}/checkpoint_{step:09d}", "checkpoint", pre[name], name,
                                               pre_exp, step))
    return {"uri": uri, "client": client, "pre": pre, "down_exp": down_exp}


def test_report_groups_by_pretraining_run_and_draws_its_plots(two_pretrainings, tmp_path):
    from cola_ray.downstream.report import report
    from cola_ray.downstream.tags import KIND_TAG

    d = two_pretrainings
    r = report("test-downstream", tmp_path / "report", tracking_uri=d["uri"])
    a, b = d["pre"]["cola-a"], d["pre"]["cola-b"]
    assert list(r.groups) == [a, b] and r.names == {a: "cola-a", b: "cola-b"}
    assert r.groups[a].cells["toy", "COLA frozen"].accuracy == pytest.approx(70.0)  # its latest checkpoint
    assert r.groups[b].cells["toy", "COLA frozen"].accuracy == pytest.approx(80.0)
    for g in r.groups.values():  # the baseline that measured no pre-training run is beside each
        assert g.cells["toy", "log-mel"].accuracy == pytest.approx(40.0)
    md = (tmp_path / "report" / "report.md").read_text()
    assert f"## Pre-training run cola-a (`{a}`, checkpoint step 300)" in md  # the step its cells measured
    assert f"## Pre-training run cola-b (`{b}`, checkpoint step 300)" in md
    assert md.count("| toy | 40.0 |") == 2

    assert set(r.files) >= {"markdown", "csv", "png", "pretraining_png", "accuracy_vs_step_png"}
    for key in ("png", "pretraining_png", "accuracy_vs_step_png"):
        assert is_png(r.files[key]), key
    run = d["client"].get_run(r.run_id)
    assert run.data.tags[KIND_TAG] == "report"
    assert run.data.tags["cola_ray.pretrain.run_ids"] == f"{a},{b}"  # two: no single run claimed
    logged = {f.path for f in d["client"].list_artifacts(r.run_id, "report")}
    assert {"report/pretraining.png", "report/accuracy_vs_step.png", "report/report.png"} <= logged


def test_the_plots_read_the_curves_and_the_checkpoint_steps(two_pretrainings):
    from cola_ray.downstream.report import accuracy_by_step, measured_runs, pretraining_curves

    d = two_pretrainings
    a, b = d["pre"]["cola-a"], d["pre"]["cola-b"]
    curves = pretraining_curves(d["client"], [a, b, "0" * 32])  # a run this store lacks is left out
    assert set(curves["loss"]) == {a, b} and len(curves["contrastive_accuracy"][a]) == 31
    points = accuracy_by_step(d["client"], measured_runs(d["client"], d["down_exp"]), [a, b])
    assert points["toy"]["cola-a · COLA frozen"] == [(100, 50.0), (200, 60.0), (300, 70.0)]
    online = points["toy"]["cola-b · online eval"]
    assert [s for s, _ in online] == [100, 200, 300]
    assert [v for _, v in online] == pytest.approx([50.0, 70.0, 90.0])
