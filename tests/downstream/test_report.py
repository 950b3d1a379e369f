"""The report table from cells (no MLflow; the MLflow side is in test_sweep.py)."""

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
