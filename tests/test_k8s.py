"""The Kubernetes manifests (``deploy/k8s/``), checked offline: there is no cluster on the
development machine, so nothing here applies an object or starts a pod.

* every kustomization renders with ``kubectl kustomize`` (a missing kubectl fails the test,
  it does not skip), and every object that is not a custom resource validates against the
  Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail) of the
  oldest supported version and the newest the package ships;
* KEDA's ScaledObjects (no package here ships KEDA's CRD schema) are checked field by field,
  and their query names a series the real exporter serves;
* the facts that matter: one Deployment, PodDisruptionBudget and ScaledObject per stage; every
  ``pixelrelay`` command line parses with the real CLI parser, and every worker's settings
  (ConfigMap + its environment + its flags) pass the real ``Settings`` validation; GPU
  requests only where ``--device cuda`` is; grace period, visibility timeout, cool-down and
  liveness age exceed a batch as the code bounds it (``workers.celery_app.time_limits``);
  secrets referenced from the Secret, never inlined, never on a command line; the nightly
  CronJob's shell line, run for real against a stand-in ``pixelrelay`` that parses its argv
  with the real parser, passes the exit code through; the Redis StatefulSet's command, run
  with a real redis-server, requires the password without putting it on its command line.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import yaml

from pixelrelay.pipeline import constants as C

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
NAMESPACE = "pixelrelay"
SECRET = "pixelrelay-secrets"
# Every value that is a secret: none may appear as a literal anywhere in a manifest.
SECRET_KEYS = {
    "PIXELRELAY_REDIS_URL",
    "PIXELRELAY_SIGNING_KEY",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "REDIS_PASSWORD",
    "REDISCLI_AUTH",
    "HF_TOKEN",
    "PIXELRELAY_NOTIFY_URL",
}
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
VALIDATE_VERSIONS = ("1.29.0", "latest")  # the oldest we claim (CronJob timeZone, probe grace: GA 1.27)
TARGETS = ("base", "overlays/gpu", "overlays/external-redis", "examples")
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob")


def _kubectl() -> str:
    found = shutil.which("kubectl")
    if not found:
        pytest.fail(
            "kubectl not found: `kubectl kustomize` renders deploy/k8s (install kubectl; this test never skips)"
        )
    return found


def _kustomize(folder: Path) -> list[dict]:
    result = subprocess.run([_kubectl(), "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {folder}: {result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@functools.cache
def _render(target: str) -> tuple[dict, ...]:
    return tuple(_kustomize(K8S / target))


def render(target: str) -> list[dict]:
    import copy

    return copy.deepcopy(list(_render(target)))


def _overlay(tmp_path: Path, body: str) -> list[dict]:
    """Render a throwaway overlay written to ``tmp_path`` (kustomize wants relative paths)."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(body.replace("K8S", rel))
    return _kustomize(tmp_path)


def objects(docs, kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_spec(obj: dict) -> dict:
    if obj["kind"] == "CronJob":
        return obj["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return obj["spec"]["template"]["spec"]


def workloads(docs):
    return [d for d in docs if d["kind"] in WORKLOADS]


def pixelrelay_containers(docs):
    """(workload, pod spec, container) for every container that runs the pixelrelay image."""
    for obj in workloads(docs):
        spec = pod_spec(obj)
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            if c["image"].split(":")[0].rsplit("/", 1)[-1] == "pixelrelay":
                yield obj, spec, c


def parse_cli(argv: list[str]):
    """argv parsed by the real ``pixelrelay`` parser (``models`` by its own); a flag the CLI does
    not have fails the test."""
    from pixelrelay.producer.cli import build_parser

    try:
        args = build_parser().parse_args(argv)
        if args.command == "models":
            from pixelrelay.producer.models_cli import build_parser as models_parser

            args.models = models_parser().parse_args(args.rest)
    except SystemExit as exc:
        pytest.fail(f"`pixelrelay {' '.join(argv)}` does not parse (exit {exc.code})")
    return args


def worker_deployments(docs) -> dict[str, tuple[dict, dict]]:
    """stage -> (Deployment, its worker container), from the parsed command line."""
    found = {}
    for obj, _, c in pixelrelay_containers(docs):
        if obj["kind"] == "Deployment" and c.get("args", [])[:1] == ["worker"]:
            args = parse_cli(c["args"])
            assert args.stage not in found, f"two Deployments run --stage {args.stage}"
            found[args.stage] = (obj, c)
    return found


def configmap(docs) -> dict[str, str]:
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "pixelrelay-config"]
    return cm["data"]


def worker_settings(docs, container: dict, monkeypatch, tmp_path):
    """The Settings a worker container starts with: the ConfigMap, its literal environment and
    its flags, through the CLI's own ``_settings`` (what ``pixelrelay worker`` validates)."""
    from pixelrelay.producer.cli import _settings

    for name in list(os.environ):
        if name.startswith("PIXELRELAY_"):
            monkeypatch.delenv(name)
    env = dict(configmap(docs))
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    key = tmp_path / "signing.key"
    key.write_text("k" * 32 + "\n")
    env["PIXELRELAY_SIGNING_KEY_FILE"] = str(key)  # the Secret's file, stood in for
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PIXELRELAY_REDIS_URL", "redis://:pw@redis:6379/0")  # from the Secret
    return _settings(parse_cli(container["args"]))


def batch_bounds(settings) -> tuple[float, float]:
    """(a chunk's watchdog budget at one stage, Celery's hard time limit for it): the longest a
    batch can run before the worker gives it up (``workers.lease``, ``workers.celery_app``)."""
    from pixelrelay.workers.celery_app import time_limits

    return settings.item_budget_s * settings.chunk_size, time_limits(settings)[1]


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_every_object_renders_and_validates_against_the_kubernetes_schemas(target):
    import kubernetes_validate

    docs = render(target)
    assert docs
    checked = 0
    for doc in docs:
        where = f"{target}: {doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, where
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue
        for version in VALIDATE_VERSIONS:
            version = kubernetes_validate.latest_version() if version == "latest" else version
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{where} against Kubernetes {version}: {exc}")
        checked += 1
    assert checked >= (12 if target == "base" else 1)


def test_the_components_render_on_the_base_and_validate(tmp_path):
    import kubernetes_validate

    docs = _overlay(
        tmp_path, "resources: [K8S/base]\ncomponents: [K8S/components/models-pvc, K8S/components/servicemonitor]\n"
    )
    monitors = {d["kind"]: d for d in docs if d["apiVersion"].startswith("monitoring.coreos.com/")}
    assert set(monitors) == {"ServiceMonitor", "PodMonitor"}
    exporter = objects(docs, "Service")["pixelrelay-exporter"]
    assert (
        monitors["ServiceMonitor"]["spec"]["selector"]["matchLabels"].items() <= exporter["metadata"]["labels"].items()
    )
    assert monitors["ServiceMonitor"]["spec"]["endpoints"][0]["port"] in {p["name"] for p in exporter["spec"]["ports"]}
    pods = monitors["PodMonitor"]["spec"]["selector"]["matchLabels"]
    for stage, (dep, c) in worker_deployments(docs).items():
        assert pods.items() <= dep["spec"]["template"]["metadata"]["labels"].items(), stage
        volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/var/cache/pixelrelay")
        assert volumes[mount["name"]] == {
            "name": mount["name"],
            "persistentVolumeClaim": {"claimName": "pixelrelay-models", "readOnly": True},
        }, stage
        assert mount.get("readOnly") is True
    assert configmap(docs)["HF_HUB_OFFLINE"] == "1"
    assert objects(docs, "PersistentVolumeClaim")["pixelrelay-models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    for doc in docs:
        if not doc["apiVersion"].startswith(CRD_GROUPS):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


# --- one of each per stage, and the command lines ---------------------------------------------


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_one_deployment_pdb_and_scaledobject_per_stage(target):
    docs = render(target)
    workers = worker_deployments(docs)
    assert set(workers) == set(C.STAGES)
    pdbs = list(objects(docs, "PodDisruptionBudget").values())
    scaled = list(objects(docs, "ScaledObject").values())
    assert len(scaled) == len(pdbs) == len(C.STAGES)
    for stage, (dep, _) in workers.items():
        pod_labels = dep["spec"]["template"]["metadata"]["labels"]
        assert dep["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
        assert "replicas" not in dep["spec"], f"{stage}: KEDA's HPA owns the replica count"
        (pdb,) = [p for p in pdbs if p["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()]
        assert pdb["spec"].get("maxUnavailable") == 1, stage
        (so,) = [s for s in scaled if s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]]
        assert so["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
        assert so["spec"]["scaleTargetRef"].get("apiVersion", "apps/v1") == "apps/v1"
        assert f'stage="{stage}"' in so["spec"]["triggers"][0]["metadata"]["query"]


@pytest.mark.parametrize("target", TARGETS)
def test_every_pixelrelay_command_line_parses_with_the_real_cli(target):
    seen = 0
    for obj, _, c in pixelrelay_containers(render(target)):
        if c["command"] == ["pixelrelay"]:
            parse_cli(c["args"])
        else:  # a shell line: the nightly CronJob, run for real in its own test
            assert c["command"][:2] == ["sh", "-c"] and c["command"][2].lstrip().startswith("exec pixelrelay ")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in c.get(probe, {}):
                argv = c[probe]["exec"]["command"]
                assert argv[0] == "pixelrelay", f"{obj['metadata']['name']} {probe}"
                assert parse_cli(argv[1:]).command == "health"
        seen += 1
    assert seen


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_worker_probes_run_pixelrelay_health_and_the_metrics_port_is_exposed(target):
    for stage, (dep, c) in worker_deployments(render(target)).items():
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["exec"]["command"][:2] == ["pixelrelay", "health"], (stage, probe)
            assert parse_cli(c[probe]["exec"]["command"][1:]).stage == stage, "each pod checks its own worker"
        assert c["livenessProbe"].get("terminationGracePeriodSeconds", 1e9) <= 60, "a stuck worker is not waited on"
        args = parse_cli(c["args"])
        port = args.metrics_port
        assert port and {"name": "metrics", "containerPort": port} in c["ports"], stage
        assert args.metrics_addr == "0.0.0.0", f"{stage}: /metrics on loopback only is out of Prometheus' reach"
        notes = dep["spec"]["template"]["metadata"]["annotations"]
        assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/port"] == str(port)


# --- KEDA -------------------------------------------------------------------------------------


def _exporter_exposition(redis_url: str) -> str:
    from prometheus_client import generate_latest

    from pixelrelay.pipeline.signing import Signer
    from pixelrelay.producer.exporter import registry_for

    return generate_latest(registry_for(redis.Redis.from_url(redis_url), Signer("k" * 32))).decode()


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_keda_scaledobjects_scale_each_stage_on_the_exporters_backlog(target, redis_url, monkeypatch, tmp_path):
    docs = render(target)
    served = _exporter_exposition(redis_url)
    workers = worker_deployments(docs)
    for so in objects(docs, "ScaledObject").values():
        name = so["metadata"]["name"]
        assert so["apiVersion"] == "keda.sh/v1alpha1" and so["kind"] == "ScaledObject"
        spec = so["spec"]
        (stage,) = [s for s, (dep, _) in workers.items() if dep["metadata"]["name"] == spec["scaleTargetRef"]["name"]]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus", name
        meta = trigger["metadata"]
        assert {"serverAddress", "query", "threshold"} <= set(meta), name
        assert all(isinstance(v, str) for v in meta.values()), f"{name}: KEDA's metadata values are strings"
        assert re.fullmatch(r"https?://[^\s/]+(:\d+)?(/\S*)?", meta["serverAddress"]), meta["serverAddress"]
        series = re.search(r"(pixelrelay_\w+)\{([^}]*)\}", meta["query"])
        assert series and series.group(1) == "pixelrelay_backlog_items", meta["query"]
        assert series.group(2) == f'stage="{stage}"'
        # the series the query selects is one the real exporter serves (metric and label names)
        assert f"{series.group(1)}{{{series.group(2)}}} " in served, served
        assert float(meta["threshold"]) > 0 and float(meta.get("activationThreshold", "0")) >= 0
        assert meta.get("ignoreNullValues") == "false", f"{name}: a lost exporter must not read as an empty backlog"
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] and spec["maxReplicaCount"] >= 1
        assert 5 <= spec["pollingInterval"] <= 120
        settings = worker_settings(docs, workers[stage][1], monkeypatch, tmp_path)
        chunk_budget, _ = batch_bounds(settings)
        assert spec["cooldownPeriod"] > chunk_budget, f"{name}: the cool-down must exceed a batch"
        down = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
        assert down["stabilizationWindowSeconds"] >= 300


def _gpus(container: dict) -> tuple[str | None, str | None]:
    res = container.get("resources", {})
    return res.get("requests", {}).get("nvidia.com/gpu"), res.get("limits", {}).get("nvidia.com/gpu")


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_gpu_requests_only_on_gpu_stages_and_gpu_stages_scale_to_zero(target):
    docs = render(target)
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so["spec"] for so in objects(docs, "ScaledObject").values()}
    gpu_stages = set()
    for stage, (dep, c) in worker_deployments(docs).items():
        device = parse_cli(c["args"]).device or "cpu"
        requests, limits = _gpus(c)
        if device.startswith("cuda"):
            gpu_stages.add(stage)
            assert limits == "1" and requests in (None, "1"), stage
            assert c["image"].endswith(":cuda"), f"{stage}: --device cuda needs the CUDA build"
            spec = pod_spec(dep)
            assert any(t.get("key") == "nvidia.com/gpu" for t in spec.get("tolerations", []))
            assert spec.get("nodeSelector")
            assert dep["spec"]["strategy"]["rollingUpdate"]["maxSurge"] == 0, "a rollout needs no spare GPU"
        else:
            assert requests is None and limits is None, f"{stage} on {device} requests a GPU"
            assert c["image"].endswith(":cpu")
        if device.startswith("cuda") or stage == "decode":
            assert scaled[dep["metadata"]["name"]]["minReplicaCount"] == 0, f"{stage} must scale to zero when idle"
    for _, _, c in pixelrelay_containers(docs):  # nothing but worker Deployments holds a GPU
        if _gpus(c) != (None, None):
            assert c.get("args", [])[:1] == ["worker"]
    # encode keeps a pod: a running worker is what sweeps and rebuilds a job Redis lost
    assert scaled["pixelrelay-encode"]["minReplicaCount"] >= 1
    assert gpu_stages == ({"decode"} if target == "overlays/gpu" else set())


# --- timers against a batch -------------------------------------------------------------------


@pytest.mark.parametrize("target", ["base", "overlays/gpu"])
def test_grace_visibility_and_liveness_exceed_a_batch(target, monkeypatch, tmp_path):
    docs = render(target)
    for stage, (dep, c) in worker_deployments(docs).items():
        settings = worker_settings(docs, c, monkeypatch, tmp_path)
        chunk_budget, hard_limit = batch_bounds(settings)
        grace = pod_spec(dep)["terminationGracePeriodSeconds"]
        assert grace > hard_limit > chunk_budget, f"{stage}: grace {grace}s, a batch may take {hard_limit:g}s"
        assert settings.visibility_timeout_s > hard_limit, "Redis would redeliver a chunk still running"
        liveness_age = parse_cli(c["livenessProbe"]["exec"]["command"][1:]).max_age
        one_call = settings.batch_size * settings.item_budget_s  # heartbeat only between model calls
        assert liveness_age >= one_call + settings.health_interval_s, f"{stage}: liveness {liveness_age}s"
        ready_age = parse_cli(c["readinessProbe"]["exec"]["command"][1:]).max_age
        assert ready_age > 2 * settings.health_interval_s
        start = c["startupProbe"]
        assert start["periodSeconds"] * start["failureThreshold"] >= 300, "room for a first model load"


# --- secrets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_secrets_are_referenced_from_the_secret_never_inlined(target):
    docs = render(target)
    text = yaml.safe_dump_all(docs)
    assert not [d for d in docs if d["kind"] == "Secret"], "the Secret is created by hand, never rendered"
    assert not re.search(r"rediss?://[^\s@/]*:[^\s@/]+@", text), "a Redis URL with a password in a manifest"
    assert "change-me" not in text
    for cm in objects(docs, "ConfigMap").values():
        assert not SECRET_KEYS & set(cm.get("data", {})), cm["metadata"]["name"]
    for obj in workloads(docs):
        spec = pod_spec(obj)
        secret_volumes = {v["name"]: v["secret"] for v in spec.get("volumes", []) if "secret" in v}
        for c in spec["containers"]:
            where = f"{obj['kind']}/{obj['metadata']['name']}/{c['name']}"
            argv = " ".join(c.get("command", []) + c.get("args", []))
            assert "--redis-url" not in argv and "--requirepass" not in argv and "SIGNING_KEY=" not in argv, where
            for e in c.get("env", []):
                if e["name"] in SECRET_KEYS:
                    assert "value" not in e, f"{where}: {e['name']} inlined"
                    assert e["valueFrom"]["secretKeyRef"]["name"] == SECRET, where
            for ref in c.get("envFrom", []):
                assert "secretRef" not in ref or ref["secretRef"]["name"] == SECRET
            names = {e["name"] for e in c.get("env", [])}
            if c["image"].startswith("pixelrelay") and "PIXELRELAY_REDIS_URL" in names:
                # the signing key: a file from the Secret, at the ConfigMap's path
                key_dir = os.path.dirname(configmap(render("base"))["PIXELRELAY_SIGNING_KEY_FILE"])
                (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == key_dir]
                volume = secret_volumes[mount["name"]]
                assert volume["secretName"] == SECRET and mount.get("readOnly") is True, where
                assert {"key": "signing.key", "path": "signing.key"} in volume["items"]
                assert volume["defaultMode"] & 0o007 == 0, "not world-readable"


def test_the_example_secret_file_names_every_key_the_manifests_reference():
    example = (K8S / "secrets.env.example").read_text()
    listed = {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}
    referenced = set()
    for target in TARGETS:
        for obj in workloads(render(target)):
            spec = pod_spec(obj)
            for c in spec["containers"]:
                referenced |= {
                    e["valueFrom"]["secretKeyRef"]["key"]
                    for e in c.get("env", [])
                    if "secretKeyRef" in e.get("valueFrom", {}) and not e["valueFrom"]["secretKeyRef"].get("optional")
                }
    assert referenced - {"signing.key"} <= listed, referenced - listed
    assert {"REDIS_PASSWORD", "PIXELRELAY_REDIS_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= listed
    ignored = (K8S / ".gitignore").read_text().split()
    assert {"secrets.env", "signing.key"} <= set(ignored)


def test_init_secrets_writes_private_consistent_files_and_never_overwrites(tmp_path):
    from pixelrelay.pipeline.settings import read_key_file

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    script = [shutil.which("bash") or "bash", str(K8S / "init-secrets.sh"), str(tmp_path)]
    result = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    values = dict(line.split("=", 1) for line in (tmp_path / "secrets.env").read_text().splitlines())
    assert set(values) == {"REDIS_PASSWORD", "PIXELRELAY_REDIS_URL"}
    assert values["PIXELRELAY_REDIS_URL"] == f"redis://:{values['REDIS_PASSWORD']}@redis:6379/0"
    assert len(read_key_file(str(tmp_path / "signing.key"))) >= 32
    for name in ("secrets.env", "signing.key"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    assert values["REDIS_PASSWORD"] not in result.stderr + result.stdout
    again = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "exists" in again.stderr
    assert dict(line.split("=", 1) for line in (tmp_path / "secrets.env").read_text().splitlines()) == values


# --- pods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", TARGETS)
def test_pixelrelay_pods_run_unprivileged_on_a_read_only_root(target):
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text().split("AS runtime", 1)[1]
    uid = int(re.findall(r"^USER\s+(\d+)", dockerfile, re.M)[-1])
    docs = render(target)
    data = configmap(render("base"))
    for obj, spec, c in pixelrelay_containers(docs):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == uid and pod["fsGroup"] == uid, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert spec["enableServiceLinks"] is False, f"{where}: Service env vars could shadow PIXELRELAY_ settings"
        assert spec["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
        assert "emptyDir" in mounts["/tmp"], f"{where}: /tmp is the only writable temp folder"
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), where
        if c.get("args", [])[:1] == ["worker"]:
            assert data["PIXELRELAY_HEALTH_FILE"].startswith("/tmp/")
            assert data["HF_HOME"].startswith("/var/cache/pixelrelay/") and "/var/cache/pixelrelay" in mounts
            assert spec["terminationGracePeriodSeconds"] > 60


def test_the_exporter_is_always_on_behind_a_service():
    docs = render("base")
    dep = objects(docs, "Deployment")["pixelrelay-exporter"]
    (c,) = pod_spec(dep)["containers"]
    args = parse_cli(c["args"])
    assert args.command == "exporter" and args.port == 9808
    assert args.metrics_addr == "0.0.0.0", "the exporter on loopback only is out of Prometheus' reach"
    assert dep["spec"]["replicas"] >= 1
    assert dep["metadata"]["name"] not in {
        so["spec"]["scaleTargetRef"]["name"] for so in objects(docs, "ScaledObject").values()
    }
    svc = objects(docs, "Service")["pixelrelay-exporter"]
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["port"] == 9808
    assert svc["metadata"]["annotations"]["prometheus.io/port"] == "9808"


# --- the nightly CronJob and the one-off Job --------------------------------------------------


def _stand_in(tmp_path: Path) -> Path:
    """A ``pixelrelay`` for the shell line: parses its argv with the real parser, records it,
    exits with $STAND_IN_EXIT."""
    folder = tmp_path / "bin"
    folder.mkdir()
    shim = folder / "pixelrelay"
    shim.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "from pixelrelay.producer.cli import build_parser\n"
        "args = build_parser().parse_args(sys.argv[1:])\n"
        "json.dump(vars(args), open(os.environ['STAND_IN_OUT'], 'w'))\n"
        "sys.exit(int(os.environ['STAND_IN_EXIT']))\n"
    )
    shim.chmod(0o755)
    return folder


def test_the_nightly_cronjob_submits_incrementally_once_a_night_and_reports_its_exit_code(tmp_path):
    from pixelrelay.pipeline.messages import JOB_ID_PATTERN

    (cron,) = objects(render("base"), "CronJob").values()
    spec = cron["spec"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert re.fullmatch(r"\S+ \S+ \S+ \S+ \S+", spec["schedule"])
    job = spec["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0
    pod = job["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (c,) = pod["containers"]
    assert c["command"][:2] == ["sh", "-c"]
    line = c["command"][2]
    assert "||" not in line and ";" not in line and line.startswith("exec pixelrelay submit "), line
    env = {e["name"]: e["value"] for e in c["env"] if "value" in e}
    bin_dir = _stand_in(tmp_path)
    out = tmp_path / "argv.json"
    run_env = {**env, "PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "STAND_IN_OUT": str(out)}
    for code in (1, 0):  # some items failed -> the Job fails; all done -> it completes
        before = dt.datetime.now(dt.UTC).date().isoformat()
        result = subprocess.run(
            ["sh", "-c", line], env={**run_env, "STAND_IN_EXIT": str(code)}, capture_output=True, text=True, timeout=60
        )
        after = dt.datetime.now(dt.UTC).date().isoformat()
        assert result.returncode == code, result.stderr  # the Job's status is pixelrelay's exit code
        args = json.loads(out.read_text())
        assert args["command"] == "submit" and args["incremental"] and args["wait"] and args["report"]
        assert args["input"] == env["NIGHTLY_INPUT"] and args["out"] == env["NIGHTLY_OUTPUT"]
        assert args["job_id"] in (f"nightly-{before}", f"nightly-{after}")
        assert re.match(JOB_ID_PATTERN, args["job_id"])
        assert args["timeout"] == float(env["NIGHTLY_TIMEOUT_S"])
    assert job["activeDeadlineSeconds"] > args["timeout"], "killed before pixelrelay's own --timeout"


def test_the_one_off_job_example_submits_once_and_waits():
    docs = render("examples")
    job = objects(docs, "Job")["pixelrelay-submit-once"]
    assert job["spec"]["backoffLimit"] == 0
    pod = pod_spec(job)
    assert pod["restartPolicy"] == "Never"
    args = parse_cli(pod["containers"][0]["args"])
    assert args.command == "submit" and args.wait and args.report and args.job_id
    from pixelrelay.pipeline.messages import JOB_ID_PATTERN

    assert re.match(JOB_ID_PATTERN, args.job_id)
    assert job["spec"]["activeDeadlineSeconds"] > args.timeout
    pull = objects(docs, "Job")["pixelrelay-models-pull"]
    (c,) = pod_spec(pull)["containers"]
    assert parse_cli(c["args"]).models.specs
    assert {"name": "HF_HUB_OFFLINE", "value": "0"} in c["env"]


# --- Redis ------------------------------------------------------------------------------------


def test_redis_statefulset_keeps_an_aof_on_a_claim_and_never_evicts():
    docs = render("base")
    sts = objects(docs, "StatefulSet")["redis"]
    svc = objects(docs, "Service")["redis"]
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "redis"
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (c,) = pod_spec(sts)["containers"]
    assert c["image"].startswith("redis:7")
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    line = " ".join(c["command"][2].split())
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--dir /data"):
        assert option in line
    for probe in ("readinessProbe", "livenessProbe"):
        assert "redis-cli ping" in c[probe]["exec"]["command"][-1]
    assert {e["name"] for e in c["env"]} == {"REDIS_PASSWORD", "REDISCLI_AUTH"}
    policy = objects(docs, "NetworkPolicy")["redis"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()


@pytest.mark.slow
def test_the_redis_command_requires_the_password_and_keeps_it_off_the_command_line(tmp_path):
    from pixelrelay.producer.embedded import free_port, redis_server_binary

    (sts,) = objects(render("base"), "StatefulSet").values()
    (c,) = pod_spec(sts)["containers"]
    port = free_port()
    for name in ("run", "data"):
        (tmp_path / name).mkdir()
    line = (
        c["command"][2]
        .replace("/run/redis", str(tmp_path / "run"))
        .replace("/data", str(tmp_path / "data"))
        .replace("exec redis-server", f"exec {redis_server_binary()}")
        + f" --port {port} --bind 127.0.0.1"
    )
    password = "pw-" + os.urandom(8).hex()
    proc = subprocess.Popen(
        ["sh", "-c", line],
        env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=password)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        config = {k: client.config_get(k)[k] for k in ("appendonly", "appendfsync", "maxmemory-policy", "maxmemory")}
        assert config == {
            "appendonly": "yes",
            "appendfsync": "everysec",
            "maxmemory-policy": "noeviction",
            "maxmemory": str(3 * 1024**3),
        }
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # exec: the shell became redis-server
        assert b"redis-server" in cmdline and password.encode() not in cmdline
        assert stat.S_IMODE((tmp_path / "run" / "auth.conf").stat().st_mode) == 0o600
        cli = shutil.which("redis-cli") or str(Path(redis_server_binary()).with_name("redis-cli"))
        probe = c["livenessProbe"]["exec"]["command"][-1].replace("redis-cli", f"{cli} -h 127.0.0.1 -p {port}")
        assert (
            subprocess.run(
                ["sh", "-c", probe], env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": password}, timeout=10
            ).returncode
            == 0
        )
        assert (
            subprocess.run(
                ["sh", "-c", probe],
                env={"PATH": os.environ["PATH"], "REDISCLI_AUTH": "wrong"},
                timeout=10,
                capture_output=True,
            ).returncode
            != 0
        )
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_external_redis_overlay_drops_the_statefulset_and_keeps_the_secret_url():
    docs = render("overlays/external-redis")
    assert not objects(docs, "StatefulSet") and "redis" not in objects(docs, "Service")
    assert not objects(docs, "NetworkPolicy")
    assert set(worker_deployments(docs)) == set(C.STAGES)
    for _, _, c in pixelrelay_containers(docs):
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c.get("env", []) if "valueFrom" in e}
        if c.get("args", [])[:1] != ["models"]:
            assert refs["PIXELRELAY_REDIS_URL"] == SECRET


def test_the_documented_prometheus_address_patch_reaches_every_scaledobject(tmp_path):
    """The overlay deploy/README.md shows for pointing KEDA at your Prometheus."""
    docs = _overlay(
        tmp_path,
        """\
resources: [K8S/base]
patches:
  - target:
      kind: ScaledObject
    patch: |-
      - op: replace
        path: /spec/triggers/0/metadata/serverAddress
        value: http://prometheus.example.internal:9090
""",
    )
    addresses = {
        so["spec"]["triggers"][0]["metadata"]["serverAddress"] for so in objects(docs, "ScaledObject").values()
    }
    assert addresses == {"http://prometheus.example.internal:9090"}
