"""Where ``/metrics`` listens, as someone else on the network sees it: a worker's metrics server
and ``pixelrelay exporter`` bind loopback unless ``--metrics-addr``/``--addr``
(``PIXELRELAY_METRICS_ADDR``) says otherwise. The bound address is read from the kernel's
socket table (``/proc/net/tcp``), as ``ss -ltn`` shows it, and a connection to the machine's
own non-loopback address is tried as a remote scraper would."""

from __future__ import annotations

import socket
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from pixelrelay.pipeline.settings import Settings
from pixelrelay.producer import exporter
from pixelrelay.producer.cli import build_parser
from pixelrelay.producer.embedded import free_port
from pixelrelay.workers import metrics
from tests.conftest import wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/net/tcp (Linux)")


def listening(port: int) -> set[str]:
    """The local addresses of the IPv4 sockets listening on ``port``."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        hex_ip, hex_port = local.split(":")
        if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
            found.add(socket.inet_ntoa(bytes.fromhex(hex_ip)[::-1]))
    return found


def outside_address() -> str | None:
    """This machine's address on its default route (not loopback), or None without one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the route
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if addr.startswith("127.") or addr == "0.0.0.0" else addr


def reachable(addr: str, port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}:{port}/metrics", timeout=3) as resp:
            return resp.status == 200
    except OSError:
        return False


def assert_loopback_only(port: int) -> None:
    assert listening(port) == {"127.0.0.1"}
    outside = outside_address()
    if outside is not None:
        assert not reachable(outside, port), f"/metrics answered on {outside}"
    assert reachable("127.0.0.1", port)


@pytest.fixture()
def worker_metrics(monkeypatch):
    """``metrics.serve`` in this process, shut down and switched off again afterwards."""
    monkeypatch.setattr(metrics, "_enabled", False)
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    servers = []

    def serve(port: int, addr: str | None = None):
        settings = Settings.from_env(metrics_port=port, **({"metrics_addr": addr} if addr else {}))
        server = metrics.serve(settings.metrics_port, 1, settings.metrics_addr)
        servers.append(server)
        return server

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_a_workers_metrics_listen_on_loopback_only_by_default(worker_metrics):
    port = free_port()
    worker_metrics(port)
    assert_loopback_only(port)


def test_a_workers_metrics_listen_on_the_address_asked_for(worker_metrics):
    port = free_port()
    worker_metrics(port, "0.0.0.0")
    assert listening(port) == {"0.0.0.0"}
    outside = outside_address()
    if outside is not None:
        assert reachable(outside, port)


def test_the_flags_and_the_environment_name_the_address(monkeypatch):
    parser = build_parser()
    assert parser.parse_args(["worker", "--stage", "plan", "--metrics-addr", "0.0.0.0"]).metrics_addr == "0.0.0.0"
    assert parser.parse_args(["exporter", "--addr", "::"]).metrics_addr == "::"
    assert Settings.from_env().metrics_addr == "127.0.0.1"
    monkeypatch.setenv("PIXELRELAY_METRICS_ADDR", "0.0.0.0")
    assert Settings.from_env().metrics_addr == "0.0.0.0"
    monkeypatch.setenv("PIXELRELAY_METRICS_ADDR", "127.0.0.1; rm -rf /")
    with pytest.raises(Exception, match="IP address"):
        Settings.from_env()


def _exporter(settings: Settings, port: int, addr: str | None = None):
    stop = threading.Event()
    thread = threading.Thread(target=exporter.serve, args=(settings, port, stop, addr), daemon=True)
    thread.start()
    wait_until(lambda: reachable("127.0.0.1", port) or listening(port), timeout=10)
    return stop, thread


@pytest.mark.parametrize("asked", [None, "0.0.0.0"])
def test_the_exporter_listens_on_loopback_unless_told_otherwise(redis_url, asked):
    port = free_port()
    settings = Settings.from_env(redis_url=redis_url, insecure_no_signing=True)
    stop, thread = _exporter(settings, port, asked)
    try:
        if asked is None:
            assert_loopback_only(port)
        else:
            assert listening(port) == {"0.0.0.0"}
    finally:
        stop.set()
        thread.join(timeout=10)
