"""The cluster configs under cluster/ (and the jobs they start), checked offline.

- ``cluster/aws.yaml`` goes through the first steps of ``ray up`` itself: Ray's
  ``prepare_config`` (defaults merged from ray/autoscaler/aws/defaults.yaml) and
  ``validate_config`` (the JSON schema ray/autoscaler/ray-schema.json shipped with the
  installed Ray, plus Ray's cross-field checks), with every non-loopback connection and
  DNS lookup refused, so nothing can reach AWS.
- ``cluster/kuberay/*.yaml``: the fields a RayCluster / RayJob needs, the admission rules
  of KubeRay's validating code (ray-operator/controllers/ray/utils/validation.go, ported
  below), and agreement with each other and with the repo: the RayJobs select the
  RayCluster, their placement overrides name resources the worker groups offer, every
  script and config an entrypoint names exists, and the pretrain entrypoint loads with
  ``cola_ray.config.load_config`` under the job's environment.
- Runtime environments pass Ray's ``RuntimeEnv`` validation, and the package Ray would
  upload (built with Ray's own ``create_package``) holds the code and none of the local
  venv, runs, databases or tests.
- Security: dashboards not reachable publicly, Ray token auth on everywhere, and no
  credentials in any file under cluster/ or jobs/ (a scanner that is itself checked on
  planted canaries).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import shlex
import socket
import zipfile
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from helpers.paths import REPO
CLUSTER = REPO / "cluster"
AWS_YAML = CLUSTER / "aws.yaml"
RUNTIME_ENV_YAML = CLUSTER / "runtime_env.yaml"
KUBERAY = CLUSTER / "kuberay"
RAYCLUSTER_YAML = KUBERAY / "raycluster.yaml"
RAYJOB_YAMLS = {"pretrain": KUBERAY / "rayjob-pretrain.yaml", "sweep": KUBERAY / "rayjob-sweep.yaml",
                "downstream": KUBERAY / "rayjob-downstream.yaml"}

DECODE_RESOURCE = "decode-node"
GPU_RESOURCE = "gpu-node"


def _ray_version() -> str:
    import ray

    return ray.__version__


def _load_all(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _one(docs: list[dict], kind: str) -> dict:
    found = [d for d in docs if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


# ---- no network: Ray's validation must run without AWS ------------------------------

@pytest.fixture
def no_network(monkeypatch):
    """Refuse every non-loopback connection and every DNS lookup of a non-local name."""

    def local(host: Any) -> bool:
        if host in (None, "", "localhost"):
            return True
        try:
            return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
        except ValueError:
            return False

    real_connect, real_connect_ex, real_getaddrinfo = (
        socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo)

    def guard(address: Any) -> None:
        if isinstance(address, tuple) and not local(address[0]):
            raise AssertionError(f"network access attempted: {address!r}")

    def connect(self, address):
        guard(address)
        return real_connect(self, address)

    def connect_ex(self, address):
        guard(address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not local(host):
            raise AssertionError(f"DNS lookup attempted: {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # Any credentials boto3 might find must not be real ones.
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)


def test_no_network_guard_refuses_remote_hosts(no_network):
    with pytest.raises(AssertionError, match="DNS lookup"):
        socket.getaddrinfo("ec2.us-west-2.amazonaws.com", 443)
    with socket.socket() as s, pytest.raises(AssertionError, match="network access"):
        s.connect(("192.0.2.1", 443))


# ---- cluster/aws.yaml: Ray's own cluster-launcher validation ------------------------

def _prepared_aws_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load(AWS_YAML.read_text()))
    validate_config(config)
    return config


def test_aws_cluster_yaml_passes_rays_validation(no_network):
    """prepare_config + validate_config: what `ray up` runs before it calls AWS."""
    config = _prepared_aws_config()
    assert config["provider"]["type"] == "aws"
    assert config["head_node_type"] in config["available_node_types"]
    # Our start commands survived the merge with Ray's defaults (whose head command binds
    # the dashboard to 0.0.0.0).
    raw = yaml.safe_load(AWS_YAML.read_text())
    assert config["head_start_ray_commands"] == raw["head_start_ray_commands"]
    assert config["worker_start_ray_commands"] == raw["worker_start_ray_commands"]


@pytest.mark.parametrize("mutate, error", [
    (lambda c: c["available_node_types"]["ray.worker.gpu"]["resources"].update({GPU_RESOURCE: 0.5}),
     "is not of type 'integer'"),
    (lambda c: c.update({"dashboard_host": "0.0.0.0"}), "Additional properties"),
    (lambda c: c["available_node_types"]["ray.worker.decode"].pop("node_config"), "node_config"),
])
def test_aws_validation_is_live(no_network, mutate, error):
    """The same validation rejects a broken copy of the file (it is not a no-op)."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(yaml.safe_load(AWS_YAML.read_text()))
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, KeyError, ValueError), match=error):
        validate_config(prepare_config(config))


def test_aws_node_types_place_the_work(no_network):
    config = _prepared_aws_config()
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no tasks or training workers on the head"
    assert not head["resources"].get("GPU")
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) > 0]
    decode = [t for t in workers.values() if t["resources"].get(DECODE_RESOURCE, 0) > 0]
    assert gpu and all(t["resources"].get(GPU_RESOURCE, 0) >= 1 for t in gpu)
    assert decode and all(not t["resources"].get("GPU") for t in decode), "decode nodes are CPU-only"
    for name, t in workers.items():
        assert t["max_workers"] >= t["min_workers"] >= 0, name
        # S3 through an instance profile, never keys.
        profile = t["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Name") or profile.get("Arn"), f"{name}: no IAM instance profile"
    assert "IamInstanceProfile" in head["node_config"], "the head's role is chosen, not Ray's broad default"
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]


def test_aws_runs_the_pinned_ray_and_installs_cola_ray(no_network):
    config = _prepared_aws_config()
    docker = config["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            assert f":{_ray_version()}" in docker[key], f"docker.{key} is not Ray {_ray_version()}"
    installs = [c for c in config["setup_commands"] if "pip install" in c and "cola" in c.replace("_", "-")]
    assert installs, "setup_commands must pip install cola-ray"
    mounted = set(config["file_mounts"])
    for cmd in installs:
        remote = re.search(r"(~/[\w./-]+?)/", cmd)
        if remote:  # installing from a folder copied by file_mounts
            assert remote.group(1) in mounted, f"{cmd!r} installs from a path nothing mounts"


# ---- security: dashboards, token auth -----------------------------------------------

_DASHBOARD_HOST = re.compile(r"--dashboard-host[= ]+(\S+)")


def _private_or_loopback(host: str) -> bool:
    host = host.strip("'\"")
    if host in ("localhost",) or host.startswith("$("):  # e.g. $(hostname -I | cut -d' ' -f1)
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return (ip.is_loopback or ip.is_private) and not ip.is_unspecified


def test_aws_dashboard_not_public_and_token_auth_on(no_network):
    config = _prepared_aws_config()
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    hosts = [h for cmd in starts for h in _DASHBOARD_HOST.findall(cmd)]
    assert hosts, "the head's ray start must bind the dashboard explicitly (Ray's AWS default is 0.0.0.0)"
    assert all(_private_or_loopback(h) for h in hosts), f"dashboard bound to {hosts}"

    docker_env = " ".join(config["docker"].get("run_options", []) + config["docker"].get("head_run_options", []))
    auth_in_container = bool(re.search(r"(--env|-e)[= ]RAY_AUTH_MODE=token\b", docker_env))
    for cmd in starts:
        if "ray start" in cmd:
            assert auth_in_container or "RAY_AUTH_MODE=token" in cmd, f"token auth not set for: {cmd}"
    # Every node gets the token (from a file, not from this config).
    assert "~/.ray/auth_token" in config["file_mounts"]


def test_kuberay_head_not_exposed_and_token_auth_on():
    docs = _load_all(RAYCLUSTER_YAML)
    cluster = _one(docs, "RayCluster")
    spec = cluster["spec"]
    assert spec.get("authOptions", {}).get("mode") == "token", "RayCluster needs authOptions.mode: token"
    head = spec["headGroupSpec"]
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the head Service must stay cluster-internal"
    assert not head.get("enableIngress"), "no Ingress to the dashboard"
    for doc in docs:
        assert doc.get("kind") != "Ingress"
        if doc.get("kind") == "Service":
            assert doc.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
    for name, pod in _pod_specs(spec):
        assert not pod.get("hostNetwork"), f"{name}: hostNetwork would put the dashboard on the node's network"
        for container in pod.get("containers", []):
            for env in container.get("env", []):
                if env.get("name") == "RAY_AUTH_MODE":
                    assert env.get("value") == "token", f"{name}: RAY_AUTH_MODE={env.get('value')}"
    for params in [head.get("rayStartParams", {})] + [g.get("rayStartParams", {}) for g in spec["workerGroupSpecs"]]:
        assert "dashboard-host" not in params or params["dashboard-host"] != "::"


_AUTH_DISABLED = re.compile(r"RAY_AUTH_MODE[\"']?\s*(?:=|:|\n\s*value:)\s*[\"']?disabled", re.I)


def test_token_auth_never_disabled_anywhere():
    bad = [str(p.relative_to(REPO)) for p in _scanned_files() if _AUTH_DISABLED.search(p.read_text(errors="replace"))]
    assert not bad, f"RAY_AUTH_MODE=disabled in {bad}"


# ---- KubeRay manifests --------------------------------------------------------------

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def _pod_specs(spec: dict) -> Iterator[tuple[str, dict]]:
    yield "head", spec["headGroupSpec"]["template"]["spec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]["spec"]


def _ray_resources(params: dict) -> dict[str, float]:
    """rayStartParams.resources as KubeRay reads it: quotes trimmed, then JSON."""
    raw = params.get("resources")
    if raw is None:
        return {}
    return {k: float(v) for k, v in json.loads(raw.strip("'\"` ").replace('\\"', '"')).items()}


def _limits(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})


def _rayclusters() -> tuple[dict, dict]:
    docs = _load_all(RAYCLUSTER_YAML)
    return _one(docs, "RayCluster"), _one(docs, "ServiceAccount")


def test_raycluster_has_what_kuberay_needs():
    cluster, _ = _rayclusters()
    assert cluster["apiVersion"] == "ray.io/v1"
    name = cluster["metadata"]["name"]
    assert _DNS1035.match(name) and len(name) <= 53, "KubeRay: DNS-1035 label, at most 53 characters"
    spec = cluster["spec"]
    assert spec["rayVersion"] == _ray_version(), "rayVersion must be the Ray that pyproject.toml pins"
    assert spec.get("enableInTreeAutoscaling") is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"].get("num-cpus") == "0", "no Ray work on the head"
    groups = spec["workerGroupSpecs"]
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), "worker group names must be unique"
    for group_name, pod in _pod_specs(spec):
        containers = pod.get("containers", [])
        assert containers, f"{group_name}: at least one container (KubeRay)"
        assert _ray_version() in containers[0]["image"], f"{group_name}: image is not Ray {_ray_version()}"
        limits = containers[0].get("resources", {}).get("limits", {})
        assert "cpu" in limits and "memory" in limits, f"{group_name}: cpu and memory limits"
    for params, label in [(head["rayStartParams"], "head")] + [(g.get("rayStartParams", {}), g["groupName"]) for g in groups]:
        # The CRD types rayStartParams as map[string]string: a YAML number is rejected.
        assert all(isinstance(v, str) for v in params.values()), f"{label}: rayStartParams values must be strings"
        assert "labels" not in params, f"{label}: KubeRay rejects rayStartParams['labels']"
    for group in groups:
        lo, hi, n = group.get("minReplicas", 0), group.get("maxReplicas", 0), group.get("replicas", 0)
        assert 0 <= lo <= n <= hi, f"{group['groupName']}: minReplicas <= replicas <= maxReplicas"
        assert not ("resources" in group.get("rayStartParams", {}) and group.get("resources")), \
            "KubeRay: resources in rayStartParams or in the group, not both"
    assert spec.get("autoscalerOptions", {}).get("idleTimeoutSeconds", 0) >= 0


def test_raycluster_groups_offer_gpu_and_decode_resources():
    cluster, _ = _rayclusters()
    spec = cluster["spec"]
    assert not _ray_resources(spec["headGroupSpec"]["rayStartParams"])
    assert "nvidia.com/gpu" not in spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpu = [g for g in spec["workerGroupSpecs"] if int(_limits(g).get("nvidia.com/gpu", 0)) > 0]
    decode = [g for g in spec["workerGroupSpecs"] if _ray_resources(g.get("rayStartParams", {})).get(DECODE_RESOURCE)]
    assert len(gpu) == 1 and _ray_resources(gpu[0]["rayStartParams"]).get(GPU_RESOURCE, 0) >= 1
    assert len(decode) == 1 and "nvidia.com/gpu" not in _limits(decode[0]), "decode pods are CPU-only"
    # GPU pods tolerate the usual GPU taint.
    tolerations = gpu[0]["template"]["spec"].get("tolerations", [])
    assert any(t.get("key") == "nvidia.com/gpu" for t in tolerations)


def test_raycluster_s3_access_through_the_service_account():
    cluster, account = _rayclusters()
    assert account["apiVersion"] == "v1"
    assert account["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "").startswith("arn:aws:iam::")
    for name, pod in _pod_specs(cluster["spec"]):
        assert pod.get("serviceAccountName") == account["metadata"]["name"], f"{name}: not the IRSA ServiceAccount"
        for container in pod["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}, name


def _rayjob(which: str) -> dict:
    return _one(_load_all(RAYJOB_YAMLS[which]), "RayJob")


def _runtime_env(job: dict) -> dict:
    env = yaml.safe_load(job["spec"].get("runtimeEnvYAML", "")) or {}
    assert isinstance(env, dict), "runtimeEnvYAML must hold a mapping"
    return env


@pytest.mark.parametrize("which", sorted(RAYJOB_YAMLS))
def test_rayjob_has_what_kuberay_needs(which):
    job = _rayjob(which)
    cluster, _ = _rayclusters()
    assert job["apiVersion"] == "ray.io/v1"
    name = job["metadata"]["name"]
    assert _DNS1035.match(name) and len(name) <= 47, "KubeRay: DNS-1035 label, at most 47 characters"
    spec = job["spec"]
    assert spec.get("entrypoint", "").strip(), "entrypoint"
    # One of rayClusterSpec / clusterSelector; here the shared, autoscaling RayCluster.
    assert spec.get("clusterSelector", {}).get("ray.io/cluster") == cluster["metadata"]["name"]
    # KubeRay's rules for clusterSelector mode.
    assert spec.get("submissionMode", "K8sJobMode") != "SidecarMode"
    assert not spec.get("backoffLimit"), "backoffLimit is incompatible with clusterSelector"
    assert not spec.get("suspend")
    assert not spec.get("shutdownAfterJobFinishes"), "would tear down the shared cluster's job resources"
    if "activeDeadlineSeconds" in spec:
        assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    env = _runtime_env(job)
    assert env.get("working_dir"), "runtime env needs a working_dir"
    assert all(isinstance(v, str) for v in env.get("env_vars", {}).values()), "env_vars values must be strings"


@pytest.mark.parametrize("which", sorted(RAYJOB_YAMLS))
def test_rayjob_runtime_env_passes_rays_validation(which, tmp_path):
    """Ray's RuntimeEnv checks every field; the image's /home/ray/cola-ray is this repo."""
    from ray._private.runtime_env.packaging import create_package
    from ray.runtime_env import RuntimeEnv

    env = _runtime_env(_rayjob(which))
    working_dir = env["working_dir"]
    assert working_dir.startswith("/") or "://" in working_dir, "an image path or a URI: the submitter pod has no checkout"
    if "://" not in working_dir:
        env = {**env, "working_dir": str(REPO)}
    RuntimeEnv(**env)
    # What the submitter would upload from the image's copy of the repo.
    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=True, excludes=env.get("excludes", []))
    names = set(zipfile.ZipFile(pkg).namelist())
    assert "jobs/pretrain.py" in names and "cola_ray/config.py" in names


def _entrypoint(job: dict) -> tuple[str, str | None, list[str]]:
    """(script, --config value, overrides) of ``python SCRIPT --config CFG k=v ...``."""
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] in ("python", "python3"), f"entrypoint runs {argv[0]!r}, not the image's python"
    script, rest = argv[1], argv[2:]
    config = None
    if "--config" in rest:
        i = rest.index("--config")
        config = rest[i + 1]
        rest = rest[:i] + rest[i + 2:]
    return script, config, rest


@pytest.mark.parametrize("which", sorted(RAYJOB_YAMLS))
def test_rayjob_entrypoint_files_exist(which):
    script, config, _ = _entrypoint(_rayjob(which))
    named = [p for p in (script, config) if p]
    missing = [p for p in named if not (REPO / p).is_file()]
    assert not missing, f"{RAYJOB_YAMLS[which].name} names files the repo lacks: {missing}"


def test_sweep_rayjob_loads_under_its_environment(monkeypatch):
    """The sweep entrypoint's config resolves, from the job's env_vars, to S3 inputs and a
    tracking server (not the laptop defaults: a local sqlite file, /tmp)."""
    from cola_ray.downstream.sweep_config import load_sweep_config

    job = _rayjob("sweep")
    script, config, overrides = _entrypoint(job)
    for key, value in _runtime_env(job).get("env_vars", {}).items():
        monkeypatch.setenv(key, value)
    settings = load_sweep_config(REPO / config, overrides)
    assert settings["task"].startswith("s3://") and settings["encoder_ref"]
    assert str(settings.get("storage_path", "")).startswith("s3://")
    assert str(settings.get("tracking_uri", "")).startswith("http")


def test_downstream_rayjob_loads_under_its_environment(monkeypatch):
    """The suite's config resolves, from the job's env_vars, to the nine tasks in S3, S3
    storage and a tracking server; every key is one the suite knows."""
    from cola_ray.downstream.suite import load_suite_config

    job = _rayjob("downstream")
    script, config, overrides = _entrypoint(job)
    assert script == "jobs/downstream.py"
    for key, value in _runtime_env(job).get("env_vars", {}).items():
        monkeypatch.setenv(key, value)
    settings = load_suite_config(REPO / config, [*overrides, "encoder_ref=s3://b/runs/a/checkpoint_000000100"])
    assert len(settings["tasks"]) == 9 and all(t["shards"].startswith("s3://") for t in settings["tasks"])
    assert str(settings["storage_path"]).startswith("s3://") and str(settings["tracking_uri"]).startswith("http")
    assert settings["finetune"]["use_gpu"] is True and settings["probe"]["use_gpu"] is True


_REPO_PATH = re.compile(r"(?<![\w/.-])((?:jobs|cluster)/[\w/.-]+\.(?:py|ya?ml))\b")


def test_every_repo_path_named_under_cluster_exists():
    """Scripts, job configs and cluster files named anywhere in cluster/ (commands in
    comments included) are real files of the repo."""
    named = {m.group(1): p.name for p in _scanned_files((CLUSTER,)) for m in _REPO_PATH.finditer(p.read_text())}
    assert "jobs/pretrain.py" in named and "jobs/configs/paper.yaml" in named
    missing = sorted(p for p in named if not (REPO / p).is_file())
    assert not missing, {p: named[p] for p in missing}


def test_pretrain_rayjob_loads_and_fits_the_cluster(monkeypatch):
    """The pretrain entrypoint's config + overrides load under the job's environment, and
    what it asks for (decode-node, gpu-node, GPUs) is what the worker groups offer."""
    from cola_ray.config import load_config

    job = _rayjob("pretrain")
    script, config, overrides = _entrypoint(job)
    assert (script, config) == ("jobs/pretrain.py", "jobs/configs/paper.yaml")
    for key, value in _runtime_env(job).get("env_vars", {}).items():
        monkeypatch.setenv(key, value)
    cfg = load_config(REPO / config, overrides)
    assert cfg.data.shards.startswith("s3://") and cfg.storage_path.startswith("s3://")
    assert cfg.tracking.tracking_uri.startswith("http"), "a tracking server, not a local sqlite file"

    cluster, _ = _rayclusters()
    groups = cluster["spec"]["workerGroupSpecs"]
    offered = {g["groupName"]: _ray_resources(g.get("rayStartParams", {})) for g in groups}
    decode_groups = [n for n, r in offered.items() if all(k in r for k in cfg.data.decode_resources)]
    assert cfg.data.decode_resources and decode_groups, f"no worker group offers {cfg.data.decode_resources}"
    assert DECODE_RESOURCE in cfg.data.decode_resources
    gpu_group = next(g for g in groups if int(_limits(g).get("nvidia.com/gpu", 0)) > 0)
    per_pod = offered[gpu_group["groupName"]]
    assert cfg.train.use_gpu and set(cfg.train.resources_per_worker) <= set(per_pod)
    gpus = int(_limits(gpu_group)["nvidia.com/gpu"]) * gpu_group["maxReplicas"]
    assert cfg.train.num_workers <= gpus, "more training workers than GPUs the group can reach"
    for key, amount in cfg.train.resources_per_worker.items():
        assert cfg.train.num_workers * amount <= per_pod[key] * gpu_group["maxReplicas"], key
        # Workers that fit one pod by the custom resource fit it by GPUs too.
        assert round(per_pod[key] / amount) <= int(_limits(gpu_group)["nvidia.com/gpu"]), key


# ---- cluster/runtime_env.yaml -------------------------------------------------------

def _local_runtime_env() -> dict:
    env = yaml.safe_load(RUNTIME_ENV_YAML.read_text())
    assert isinstance(env, dict)
    return env


def test_runtime_env_file_passes_rays_validation(monkeypatch):
    from ray.runtime_env import RuntimeEnv

    env = _local_runtime_env()
    assert env["working_dir"] == "."
    monkeypatch.chdir(REPO)  # `ray job submit` runs from the repo root
    RuntimeEnv(**env)
    assert not {"pip", "uv", "conda", "container", "image_uri", "py_executable"} & set(env), \
        "dependencies come from the cluster image / node setup, not a per-job install"


def test_runtime_env_excludes_keep_local_state_off_the_cluster(tmp_path):
    """Ray's own packaging, with .gitignore ignored (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1):
    the excludes alone keep environments, runs, databases, data and tests out."""
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "checkout"
    kept = ["cola_ray/train/trainer.py", "jobs/pretrain.py", "jobs/configs/paper.yaml", "pyproject.toml",
            "benchmarks/pretrain_bench.py", "cola_ray/runs_util/x.py"]
    dropped = [".venv/lib/python3.11/site-packages/torch/x.so", ".git/objects/ab/cd", "runs/r1/checkpoint_1/m.pt",
               "mlruns/0/meta.yaml", "mlartifacts/1/a.bin", "mlflow.db", "basic_auth.db", "tests/data/clip.wav",
               "tests/test_x.py", "cola-demo/shards/shard-000000.tar", "dist/cola_ray-0.1.0-py3-none-any.whl",
               "cola_ray/__pycache__/x.pyc", "cola_ray.egg-info/PKG-INFO", ".pytest_cache/v/x", "shards/a.tar",
               "export/encoder.safetensors"]
    for rel in kept + dropped:
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text("x")
    pkg = tmp_path / "pkg.zip"
    create_package(str(tree), pkg, include_gitignore=False, excludes=_local_runtime_env()["excludes"])
    names = {n for n in zipfile.ZipFile(pkg).namelist() if not n.endswith("/")}
    assert names == set(kept), f"uploaded but excluded: {sorted(names - set(kept))}; lost: {sorted(set(kept) - names)}"


def test_runtime_env_package_of_this_checkout_is_small(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=False, excludes=_local_runtime_env()["excludes"])
    infos = zipfile.ZipFile(pkg).infolist()
    names = {i.filename for i in infos}
    assert {"jobs/pretrain.py", "jobs/configs/paper.yaml", "cola_ray/train/trainer.py", "pyproject.toml"} <= names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "tests/", "runs/", "mlruns/")) or n.endswith(".db")]
    size = pkg.stat().st_size
    largest = sorted(infos, key=lambda i: i.compress_size, reverse=True)[:5]
    assert size < 32 * 2**20, f"{size / 2**20:.1f} MiB to upload per job; largest: {[i.filename for i in largest]}"


# ---- no credentials in cluster/ or jobs/ --------------------------------------------

def _scanned_files(roots: tuple[Path, ...] = (CLUSTER, REPO / "jobs")) -> list[Path]:
    return sorted(p for root in roots if root.exists() for p in root.rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts)


# Text patterns: credentials that should never appear in a file, comments included.
_TEXT_SECRETS = [
    ("AWS access key id", re.compile(r"\b(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{16}\b")),
    ("AWS secret key", re.compile(r"(?i)aws_?secret_?access_?key[\"']?\s*[:=]\s*[\"']?[A-Za-z0-9/+=]{16,}")),
    ("private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
    ("password in a URL", re.compile(r"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@")),
    ("GitHub token", re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}")),
    ("Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("JWT", re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
    ("MLflow password", re.compile(r"(?i)mlflow_tracking_password\s*[:=]\s*(?![\"']?(?:\$|<|\{))[\"']?\S+")),
    # NAME=value in a shell command or INI line, where NAME says it is a secret and the
    # value is a literal (not $VAR, $(cmd), <placeholder>, a path or a file reference).
    ("secret assignment", re.compile(
        r"(?i)\b[\w.-]*(?:password|passwd|secret|token|api_?key|access_?key)[\w.-]*"
        r"(?<!_path)(?<!_file)\s*=\s*(?![\"']?(?:\$|<|\{|~|/|file:|@))[\"']?[^\s\"'$]{6,}")),
]
_SECRET_NAME = re.compile(r"(?i)(password|passwd|secret|token|api_?key|access_?key|credential|private_?key)")
_REFERENCE_NAME = re.compile(r"(?i)(_path|_file|secretname|secretkeyref|serviceaccounttoken|_mode)$")


def _literal(value: Any) -> bool:
    return isinstance(value, (str, int, float)) and not isinstance(value, bool) and str(value).strip() != "" \
        and not re.match(r"^[\"']?(\$|<|\{\{)", str(value))


def _structural_findings(node: Any, where: str) -> Iterator[str]:
    """Secrets by position in a YAML tree: secret-named keys or env entries with literal
    values, and any secret-named runtime-env variable (runtimeEnvYAML parsed too)."""
    if isinstance(node, dict):
        if "env_vars" in node and isinstance(node["env_vars"], dict):
            for key in node["env_vars"]:
                if _SECRET_NAME.search(key):
                    yield f"{where}: runtime-env variable {key} (shown in the dashboard and logs)"
        if isinstance(node.get("name"), str) and "value" in node and _SECRET_NAME.search(node["name"]) \
                and not _REFERENCE_NAME.search(node["name"]) and _literal(node["value"]):
            yield f"{where}: env {node['name']} has a literal value (use valueFrom.secretKeyRef or a file)"
        for key, value in node.items():
            key_s = str(key)
            if "/" not in key_s and "~" not in key_s and _SECRET_NAME.search(key_s) \
                    and not _REFERENCE_NAME.search(key_s) and key_s != "env_vars" and _literal(value) \
                    and not isinstance(value, (dict, list)):
                yield f"{where}: {key_s} has a literal value"
            if key_s == "runtimeEnvYAML" and isinstance(value, str):
                yield from _structural_findings(yaml.safe_load(value), f"{where}.runtimeEnvYAML")
            else:
                yield from _structural_findings(value, f"{where}.{key_s}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            yield from _structural_findings(item, f"{where}[{i}]")


def scan_for_secrets(paths: list[Path]) -> list[str]:
    findings = []
    for path in paths:
        text = path.read_text(errors="replace")
        for label, pattern in _TEXT_SECRETS:
            for m in pattern.finditer(text):
                line = text.count("\n", 0, m.start()) + 1
                findings.append(f"{path.name}:{line}: {label}")
        if path.suffix in (".yaml", ".yml"):
            for i, doc in enumerate(yaml.safe_load_all(text)):
                findings.extend(_structural_findings(doc, f"{path.name}#{i}"))
    return findings


def test_no_credentials_under_cluster_or_jobs():
    files = _scanned_files()
    assert any(p.suffix == ".yaml" for p in files) and RAYCLUSTER_YAML in files and AWS_YAML in files
    assert not scan_for_secrets(files)


_CANARIES = {
    "aws-key.yaml": "provider:\n  aws_access_key_id: AKIAIOSFODNN7EXAMPL3\n",
    "aws-secret.ini": "[default]\naws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY\n",
    "mlflow.ini": "[mlflow]\nmlflow_tracking_password = hunter2hunter2\n",
    "pem.txt": "-----BEGIN RSA PRIVATE KEY-----\nMIIB\n",
    "url.yaml": "tracking_uri: http://admin:s3cr3tpass@mlflow.internal:5000\n",
    "shell.yaml": "setup_commands:\n  - export MLFLOW_TRACKING_PASSWORD=correcthorse && ray start\n",
    "k8s-env.yaml": "env:\n  - name: AWS_SECRET_ACCESS_KEY\n    value: abc123abc123\n",
    "runtime-env.yaml": "runtimeEnvYAML: |\n  env_vars:\n    RAY_AUTH_TOKEN: $(cat ~/.ray/auth_token)\n",
    "password.yaml": "admin_password: changeme-please\n",
    "gh.sh": "git clone https://ghp_abcdefghijklmnopqrstuvwxyz0123456789@github.com/o/r\n",
}
_CLEAN = """\
authOptions:
  mode: token
secretName: cola-ray-mlflow
serviceAccountToken: {path: token}
file_mounts:
  "~/.ray/auth_token": "~/.ray/auth_token"
annotations:
  eks.amazonaws.com/role-arn: arn:aws:iam::111122223333:role/cola-ray-s3
env:
  - name: RAY_AUTH_MODE
    value: token
  - name: RAY_AUTH_TOKEN
    valueFrom: {secretKeyRef: {name: cola-ray, key: auth_token}}
  - name: AWS_WEB_IDENTITY_TOKEN_FILE
    value: /var/run/secrets/eks.amazonaws.com/serviceaccount/token
  - name: MLFLOW_TRACKING_PASSWORD
    valueFrom: {secretKeyRef: {name: cola-ray-mlflow, key: password}}
run_options: ["--env RAY_AUTH_MODE=token"]
commands:
  - RAY_AUTH_MODE=token ray start --head --dashboard-host=127.0.0.1
  - export RAY_AUTH_TOKEN_PATH=~/.ray/auth_token
  - MLFLOW_AUTH_ADMIN_PASSWORD="$(openssl rand -hex 24)" mlflow server --app-name basic-auth
"""


@pytest.mark.parametrize("name", sorted(_CANARIES))
def test_secret_scanner_finds_planted_canaries(tmp_path, name):
    path = tmp_path / name
    path.write_text(_CANARIES[name])
    assert scan_for_secrets([path]), f"canary in {name} not found"


def test_secret_scanner_passes_references_to_secrets(tmp_path):
    path = tmp_path / "clean.yaml"
    path.write_text(_CLEAN)
    assert scan_for_secrets([path]) == []
