"""``deploy/compose.yaml``, checked statically: there is no Docker engine on the development
machine, so nothing here starts a container.

* the file validates against the compose-spec JSON schema (``check-jsonschema
  --builtin-schema vendor.compose-spec``, from the test extra), and a broken copy does not;
* Redis has a password (from the env file, through a config file, never argv), AOF and
  ``noeviction``, a volume, and no published port;
* the bucket is made by a one-shot service the workers wait for, health conditions gate
  every ``depends_on``;
* one image is built once and reused by every pixelrelay service; the worker commands parse
  with the real ``pixelrelay`` argument parser, so a renamed flag fails here;
* the warm-shutdown grace outlasts a chunk, GPU decode and Flower sit under their profiles;
* no secret value is written in the file.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "deploy" / "compose.yaml"
STAGES = ("encode", "plan", "decode")
PIXELRELAY_SERVICES = (*STAGES, "decode-gpu", "cli", "exporter", "flower")


@pytest.fixture(scope="module")
def spec() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _check_jsonschema() -> str:
    found = shutil.which("check-jsonschema") or str(Path(sys.executable).with_name("check-jsonschema"))
    if not Path(found).exists():
        pytest.fail("check-jsonschema not installed: it comes with the test extra")
    return found


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [_check_jsonschema(), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_compose_file_validates_against_the_compose_spec_and_a_broken_one_does_not(tmp_path):
    result = _validate(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("stop_grace_period: 40m", "stop_grace_perod: 40m", 1))
    assert _validate(broken).returncode != 0


def test_redis_has_a_password_aof_noeviction_a_volume_and_no_published_port(spec):
    redis = spec["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert "ports" not in redis
    assert any(v.endswith(":/data") for v in redis["volumes"])
    config = redis["configs"][0]
    assert config["target"] in command
    assert spec["configs"][config["source"]]["content"].strip() == "requirepass ${REDIS_PASSWORD}"
    assert not any("requirepass" in part or "PASSWORD" in part for part in command)
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])


def test_the_bucket_is_created_once_and_everything_waits_on_health(spec):
    services = spec["services"]
    assert "mc mb --ignore-existing" in services["buckets"]["entrypoint"][-1]
    assert services["buckets"]["restart"] == "no"
    for name, service in services.items():
        for dependency, condition in (service.get("depends_on") or {}).items():
            expected = "service_completed_successfully" if dependency == "buckets" else "service_healthy"
            assert condition == {"condition": expected}, (name, dependency)
            assert dependency == "buckets" or "healthcheck" in services[dependency], dependency
    for stage in STAGES:
        assert set(services[stage]["depends_on"]) == {"redis", "minio", "buckets"}


def test_one_image_is_built_once_and_reused(spec):
    services = spec["services"]
    cpu_image = services["encode"]["image"]
    built = [name for name in PIXELRELAY_SERVICES if "build" in services[name]]
    assert built == ["encode", "decode-gpu"]  # the CPU image once, the CUDA one once
    assert services["decode-gpu"]["build"]["args"]["TORCH"] == "cuda"
    for name in PIXELRELAY_SERVICES:
        if name != "decode-gpu":
            assert services[name]["image"] == cpu_image, name
        assert services[name]["pull_policy"] == "never", name


def test_the_worker_commands_parse_with_the_real_cli(spec):
    parser = build_parser()
    for name in (*STAGES, "decode-gpu"):
        args = parser.parse_args(spec["services"][name]["command"])
        assert args.command == "worker" and args.stage == name.split("-")[0]
        assert args.metrics_addr == "0.0.0.0", f"{name}: /metrics must reach the compose network"
    exporter = parser.parse_args(spec["services"]["exporter"]["command"])
    assert exporter.command == "exporter" and exporter.metrics_addr == "0.0.0.0"
    health = spec["services"]["decode"]["healthcheck"]["test"]
    assert health[:3] == ["CMD", "pixelrelay", "health"]
    assert parser.parse_args(health[2:]).command == "health"
    assert parser.parse_args(spec["services"]["decode-gpu"]["command"]).device == "cuda"


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([hms])", duration))


def test_the_stop_grace_and_the_visibility_timeout_outlast_the_longest_batch(spec):
    from pixelrelay.workers.celery_app import time_limits

    env = {k: v for k, v in spec["x-env"].items() if "${" not in v}  # the settings, not the secrets
    settings = Settings(
        _env_file=None,
        **{k.removeprefix("PIXELRELAY_").lower(): v for k, v in env.items() if k.startswith("PIXELRELAY_")},
    )
    longest = max(settings.item_budget_s * settings.chunk_size, time_limits(settings)[1])
    assert settings.visibility_timeout_s > longest
    for stage in (*STAGES, "decode-gpu"):
        grace = _seconds(spec["services"][stage]["stop_grace_period"])
        assert grace > longest, (stage, grace, longest)
        assert spec["services"][stage]["init"] is True


def test_gpu_decode_and_the_monitors_sit_under_their_profiles(spec):
    services = spec["services"]
    gpu = services["decode-gpu"]
    assert gpu["profiles"] == ["gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in STAGES:
        assert "profiles" not in services[name] and "deploy" not in services[name]
    assert services["flower"]["profiles"] == ["monitor"] == services["exporter"]["profiles"]
    assert "celery flower" in services["flower"]["entrypoint"][-1]
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)  # loopback only


def test_no_secret_value_is_in_the_file():
    text = COMPOSE.read_text()
    assert len(re.findall(r"^\s*MINIO_ROOT_PASSWORD:", text, re.M)) == 2  # the check below sees them
    for key in (
        "REDIS_PASSWORD",
        "MINIO_ROOT_PASSWORD",
        "PIXELRELAY_SIGNING_KEY",
        "FLOWER_BASIC_AUTH",
        "MINIO_ROOT_USER",
    ):
        for value in re.findall(rf"^\s*{key}:\s*(\S+)", text, re.M):
            assert value.startswith("${"), (key, value)
    assert "AWS_SECRET_ACCESS_KEY: ${MINIO_ROOT_PASSWORD" in text
    assert re.search(r"redis://:\$\{REDIS_PASSWORD", text)
    assert "--basic-auth" not in text and "--requirepass" not in text


def test_init_secrets_writes_a_private_env_file_once(tmp_path):
    script = tmp_path / "deploy" / "init-secrets.sh"
    script.parent.mkdir()
    shutil.copy(REPO / "deploy" / "init-secrets.sh", script)
    subprocess.run(["bash", str(script)], check=True, capture_output=True, timeout=60)
    env = script.parent / ".env"
    assert env.stat().st_mode & 0o077 == 0
    first = env.read_text()
    values = dict(line.split("=", 1) for line in first.splitlines() if line and not line.startswith("#"))
    assert set(values) >= {
        "REDIS_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "PIXELRELAY_SIGNING_KEY",
        "FLOWER_BASIC_AUTH",
    }
    Settings(_env_file=None, signing_key=values["PIXELRELAY_SIGNING_KEY"])  # a key the workers accept
    assert re.fullmatch(r"[A-Za-z0-9_-]+", values["REDIS_PASSWORD"])  # safe inside the Redis URL
    subprocess.run(["bash", str(script)], check=True, capture_output=True, timeout=60)
    assert env.read_text() == first
    assert (REPO / ".gitignore").read_text().count("deploy/.env") == 1
