"""System metrics (``tracking.system_metrics``): MLflow's monitor, started per node, against a
real sqlite MLflow store; no Ray, no training."""

from __future__ import annotations

import socket
import time

import pytest
from mlflow.tracking import MlflowClient

from cola_ray.config import Config, ConfigError, load_config
from cola_ray.train import tracking


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """One sqlite store for the module (creating one takes a second or two); a run per test."""
    return f"sqlite:///{tmp_path_factory.mktemp('sysmetrics') / 'mlflow.db'}"


def make_run(db: str, name: str, *overrides: str) -> tuple[Config, str, str]:
    cfg = load_config(None, [f"tracking.tracking_uri={db}", "tracking.system_metrics_interval_s=0.2", *overrides])
    uri, run_id, _ = tracking.start_or_resume_run(cfg, name)
    return cfg, uri, run_id


def system_metrics(uri: str, run_id: str) -> dict[str, float]:
    return {k: v for k, v in MlflowClient(uri).get_run(run_id).data.metrics.items() if k.startswith("system/")}


def wait_for(uri: str, run_id: str, key: str, timeout: float = 20.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = system_metrics(uri, run_id)
        if key in found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"no {key} within {timeout}s; the run has {sorted(system_metrics(uri, run_id))}")


def test_defaults_and_validation():
    assert Config().tracking.system_metrics is True
    assert Config().tracking.system_metrics_interval_s == 10.0
    with pytest.raises(ConfigError, match="tracking.system_metrics_interval_s"):
        load_config(None, ["tracking.system_metrics_interval_s=0"])
    with pytest.raises(ConfigError, match="tracking.system_metrics"):
        load_config(None, ["tracking.system_metrics=maybe"])
    load_config(None, ["tracking.system_metrics=false", "tracking.system_metrics_interval_s=0"])  # off: unused


def test_a_node_monitor_logs_cpu_memory_and_network_under_its_node(db):
    cfg, uri, run_id = make_run(db, "node")
    monitor = tracking.start_system_metrics(uri, run_id, cfg, node_rank=0, local_rank=0)
    assert monitor is not None
    try:
        found = wait_for(uri, run_id, "system/node_0/cpu_utilization_percentage")
    finally:
        tracking.stop_system_metrics(monitor)
    for name in ("system_memory_usage_megabytes", "system_memory_usage_percentage",
                 "network_receive_megabytes", "network_transmit_megabytes"):
        assert f"system/node_0/{name}" in found, sorted(found)
    assert 0.0 <= found["system/node_0/cpu_utilization_percentage"] <= 100.0
    assert found["system/node_0/system_memory_usage_megabytes"] > 0
    tags = MlflowClient(uri).get_run(run_id).data.tags
    assert tags[tracking.SYSTEM_METRICS_NODE_TAG.format(0)] == socket.gethostname()
    assert not monitor._process, "stopped: its thread is gone"

    # A restarted worker group's monitor continues the sample steps rather than starting at 0.
    last = max(m.step for m in MlflowClient(uri).get_metric_history(run_id, "system/node_0/cpu_utilization_percentage"))
    again = tracking.start_system_metrics(uri, run_id, cfg, node_rank=0)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            steps = [m.step for m in MlflowClient(uri).get_metric_history(run_id, "system/node_0/cpu_utilization_percentage")]
            if max(steps) > last:
                break
            time.sleep(0.2)
    finally:
        tracking.stop_system_metrics(again)
    assert max(steps) > last and len(steps) == len(set(steps)), steps


def test_without_a_node_rank_the_names_are_mlflows_own(db):
    cfg, uri, run_id = make_run(db, "plain")
    monitor = tracking.start_system_metrics(uri, run_id, cfg)
    try:
        wait_for(uri, run_id, "system/cpu_utilization_percentage")
    finally:
        tracking.stop_system_metrics(monitor)


def test_off_by_flag_or_on_other_local_ranks_logs_nothing(db):
    cfg, uri, run_id = make_run(db, "off", "tracking.system_metrics=false")
    assert tracking.start_system_metrics(uri, run_id, cfg, node_rank=0) is None
    on = load_config(None, ["tracking.system_metrics_interval_s=0.2"])
    assert tracking.start_system_metrics(uri, run_id, on, node_rank=0, local_rank=1) is None
    tracking.stop_system_metrics(None)
    time.sleep(1.0)  # five intervals: a monitor, had one started, would have logged by now
    assert system_metrics(uri, run_id) == {}


def test_a_finished_run_stops_its_monitor(db):
    cfg, uri, run_id = make_run(db, "finished")
    monitor = tracking.start_system_metrics(uri, run_id, cfg, node_rank=1)
    wait_for(uri, run_id, "system/node_1/cpu_utilization_percentage")
    tracking.end_run(uri, run_id, "FINISHED")  # the driver, at the end of fit()
    monitor._process.join(timeout=10)
    assert not monitor._process.is_alive()
    tracking.stop_system_metrics(monitor)
