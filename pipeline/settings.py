"""Typed settings: flags override the environment (``PIXELRELAY_*``), which overrides defaults.

``Settings.from_env`` fails fast with ``ConfigError`` naming the bad variable. The Redis URL
may carry a password: it is a SecretStr and ``redacted_redis_url`` is the only form logged.

The signing key (``pipeline.signing``) comes from ``PIXELRELAY_SIGNING_KEY`` (the key) or
``PIXELRELAY_SIGNING_KEY_FILE`` (a file holding it, read here, once; a trailing newline is
dropped). Setting both is an error, as is a key under 16 characters or an unreadable file;
the error names the variable, never the key. The key is a SecretStr: no repr, dump or log
shows it. ``signer()`` builds the ``Signer``; without a key it raises ``MissingSigningKey``
(a ``ConfigError``) unless ``insecure_no_signing`` (``--insecure-no-signing``,
``PIXELRELAY_INSECURE_NO_SIGNING=1``).

``from_env`` warns once per process (log ``pixelrelay.pipeline.settings``, stderr by default) about
each ``PIXELRELAY_*`` variable in the environment that no setting or component reads, with
the nearest known name: a misspelt variable is otherwise silently ignored. The warning names
variables only, never their values.

The broker's visibility timeout (``visibility_s``) is a backstop, not a bound on a batch: a
lease's renewals keep its message's delivery time fresh (``pixelrelay.workers.lease``), so it
only has to outlast two leases and a minute (``min_visibility_s``); a chunk's time limits come
from its job (``pixelrelay.pipeline.limits``).
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pixelrelay.pipeline import constants as C

ENV_PREFIX = "PIXELRELAY_"
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")
_HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
# PIXELRELAY_* variables read outside ``Settings``: by components (plugins, health file,
# notify, the run's thread balance) and by deploy/compose.yaml.
OTHER_ENV = frozenset(
    ENV_PREFIX + name
    for name in (
        "PLUGINS",
        "HEALTH_FILE",
        "NOTIFY_URL",
        "NOTIFY_URL_FILE",
        "BALANCE_DIR",
        "BUCKET",
        "TAG",
        "TORCH",
        "DATA",
    )
)
_log = logging.getLogger(__name__)
_env_checked = False


class ConfigError(ValueError):
    """A bad setting; the message names it."""


class MissingSigningKey(ConfigError):
    """No signing key is configured and unsigned running is not allowed."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    redis_url: SecretStr = SecretStr(C.DEFAULT_REDIS_URL)
    s3_endpoint_url: str | None = None
    max_image_pixels: int = Field(C.DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    # A queue entry longer than this is dropped before it is decoded (workers.screen).
    max_message_bytes: int = Field(C.DEFAULT_MAX_MESSAGE_BYTES, ge=4096)
    # Bounded resources: an item whose output (source pixels x scale^2) is over this
    # fails before any model runs; decoded source images a worker holds (the batch it runs
    # plus the next one, prefetched) stay within this many bytes, except one batch alone.
    max_output_pixels: int = Field(256_000_000, ge=1)
    prefetch_bytes: int = Field(1 << 30, ge=1)
    # Prefork pools only (the solo pool has the lease watchdog alone): Celery's hard time
    # limit per task (0: derived from item_budget_s x chunk_size, see workers.celery_app)
    # and the RSS after which a pool child is replaced (0: never).
    task_time_limit_s: float = Field(0.0, ge=0.0)
    max_memory_per_child_kb: int = Field(16 * 1024 * 1024, ge=0)
    chunk_size: int = Field(C.DEFAULT_CHUNK_SIZE, ge=1, le=4096)
    window: int = Field(C.DEFAULT_WINDOW, ge=1)
    batch_size: int = Field(C.DEFAULT_BATCH_SIZE, ge=1, le=1024)
    # None: ``DEFAULT_VISIBILITY_TIMEOUT_S``; a value set must outlast ``min_visibility_s``.
    visibility_timeout_s: int | None = Field(None, ge=1)
    max_retries: int = Field(C.DEFAULT_MAX_RETRIES, ge=0, le=100)
    max_deliveries: int = Field(C.DEFAULT_MAX_DELIVERIES, ge=1, le=100)
    device: str = "cpu"
    io_threads: int = Field(4, ge=1, le=256)  # storage + image codec threads per worker process
    torch_threads: int = Field(0, ge=0, le=1024)  # 0: torch's default
    # The C allocator (pipeline.memory): "tuned" keeps feature maps in the heap between batches.
    allocator: Literal["tuned", "default"] = "tuned"
    encoder: str = C.DEFAULT_ENCODER
    planner: str = C.DEFAULT_PLANNER
    decoder: str = C.DEFAULT_DECODER
    # Backend specs this process may build besides its own encoder/planner/decoder and their
    # variants (``stages.registry.spec_allowed``): blank/comma-separated, ``*`` = anything.
    # ``submit`` refuses local-path specs unless this allows them.
    allowed_backends: str = ""
    log_level: str = "INFO"
    # Prometheus /metrics of a worker (``workers.metrics``) or ``pixelrelay exporter``; 0: off.
    # The address it listens on: loopback unless set (0.0.0.0 inside a container Prometheus scrapes).
    metrics_port: int = Field(0, ge=0, le=65535)
    metrics_addr: str = C.DEFAULT_METRICS_ADDR
    # Operations: log lines as text or JSON objects (pixelrelay.logs); how often a
    # worker touches its health file (PIXELRELAY_HEALTH_FILE, read by pixelrelay.health).
    log_format: Literal["text", "json"] = "text"
    health_interval_s: float = Field(5.0, gt=0)
    # Learned models: precision on GPU (CPU is always fp32). Learned decoders' tiled
    # inference (pipeline.tiling): a forward call may use TILE_MEMORY_MB (0: on CUDA
    # TILE_MEMORY_FRACTION of the memory available, on CPU/MPS 2048 MB; non-zero on CUDA: a
    # cap); an image that fits runs whole. Per decoder (builtin, sr, sd): _TILE caps the
    # tile side (0: the budget alone decides), _OVERLAP, _TILE_BATCH (at most this many tiles
    # or images per call) and _MIN_TILE (where the out-of-memory fallback stops).
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    tile_memory_mb: int = Field(0, ge=0, le=1 << 24)
    tile_memory_fraction: float = Field(0.8, gt=0.0, le=1.0)
    builtin_tile: int = Field(0, ge=0)
    builtin_overlap: int = Field(32, ge=0)
    builtin_tile_batch: int = Field(8, ge=1)
    builtin_min_tile: int = Field(32, ge=8)
    sr_tile: int = Field(0, ge=0)
    sr_overlap: int = Field(32, ge=0)
    sr_tile_batch: int = Field(4, ge=1)
    sr_min_tile: int = Field(32, ge=8)
    sd_tile: int = Field(128, ge=0)  # the x4 upscaler's training crop: tiles beyond it diffuse worse
    sd_overlap: int = Field(32, ge=0)
    sd_tile_batch: int = Field(2, ge=1)
    sd_min_tile: int = Field(32, ge=8)
    sd_steps: int = Field(25, ge=1, le=1000)
    sd_guidance: float = Field(7.5, ge=0.0, le=50.0)
    # Single-file checkpoints (spandrel:PATH, pipeline.checkpoints): larger ones are refused unread.
    checkpoint_max_bytes: int = Field(2 << 30, ge=1)
    # S3-compatible stores (pipeline.storage.s3). Checksums: botocore >= 1.36 adds CRC
    # checksums to every request ("when_supported"), which MinIO, Ceph, R2 and other
    # S3-compatible stores may reject; "when_required" sends them only where the API needs them.
    s3_checksums: Literal["when_required", "when_supported"] = "when_required"
    s3_retry_mode: Literal["standard", "adaptive"] = "standard"  # botocore's own retries
    s3_max_attempts: int = Field(4, ge=1, le=20)  # per request, the first one included
    s3_sse: Literal["", "AES256", "aws:kms"] = ""  # server-side encryption of every PUT
    s3_sse_kms_key_id: str = ""  # with s3_sse=aws:kms; empty: the bucket's/account's default key
    # Chunks in flight (workers.lease, workers.sweep): a worker's lease on the chunk it runs,
    # how often every worker sweeps for lost chunks (0: never), and the time a chunk may take
    # per item and stage before the watchdog fails it and restarts the worker process.
    lease_s: float = Field(60.0, ge=0.1, le=3600.0)
    sweep_interval_s: float = Field(15.0, ge=0.0, le=3600.0)
    item_budget_s: float = Field(600.0, ge=0.1)
    # Losing Redis (jobs.recover, jobs.registry): where submit registers active jobs so that
    # the workers' sweep can rebuild one whose Redis state vanished (a local folder or
    # s3://bucket/prefix; empty: no registry), and how often the sweep lists it.
    state_uri: str = ""
    registry_scan_s: float = Field(30.0, ge=0.0, le=3600.0)
    # Progress (producer.status, ``pixelrelay jobs``): a job none of whose items finished for
    # this long shows "stalled N s" instead of an ETA, and lists as ``stalled``.
    stall_s: float = Field(30.0, gt=0.0, le=86400.0)
    # Signed job data (pipeline.signing): the key, or a file holding it; never in argv.
    signing_key: SecretStr | None = None
    signing_key_file: str = ""
    insecure_no_signing: bool = False  # no key: sign nothing, accept unsigned bodies

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        scheme = urlsplit(raw).scheme if raw else ""
        if scheme == "unix":
            check_unix_url(raw)
        elif raw and scheme not in ("redis", "rediss"):
            raise ValueError(
                "must be a redis://, rediss:// or unix:///path/to/socket URL (or empty for the embedded server)"
            )
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value and urlsplit(value).scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL")
        return value or None

    @field_validator("s3_sse_kms_key_id")
    @classmethod
    def _check_kms_key(cls, value: str, info) -> str:
        value = value.strip()
        sse = info.data.get("s3_sse")  # absent when s3_sse itself is bad (reported on its own)
        if value and sse is not None and sse != "aws:kms":
            raise ValueError(f"a KMS key id needs {ENV_PREFIX}S3_SSE=aws:kms (it is {sse!r})")
        return value

    @field_validator("builtin_tile", "sr_tile", "sd_tile")
    @classmethod
    def _check_tile_cap(cls, value: int) -> int:
        if 0 < value < 16:
            raise ValueError("must be 0 (no cap: the memory budget decides) or at least 16")
        return value

    @field_validator("metrics_addr")
    @classmethod
    def _check_metrics_addr(cls, value: str) -> str:
        value = value.strip()
        try:
            ipaddress.ip_address(value)
        except ValueError:
            if not _HOSTNAME_RE.match(value):
                raise ValueError("must be an IP address (127.0.0.1, 0.0.0.0, ::) or a host name") from None
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if not _DEVICE_RE.match(value):
            raise ValueError("must be cpu, cuda, cuda:N or mps")
        return value

    @field_validator("encoder", "planner", "decoder")
    @classmethod
    def _check_backend(cls, value: str, info) -> str:
        from pixelrelay.pipeline.stages.registry import validate_spec

        return validate_spec(info.field_name, value)

    @field_validator("signing_key")
    @classmethod
    def _check_signing_key(cls, value: SecretStr | None) -> SecretStr | None:
        from pixelrelay.pipeline.signing import MIN_KEY_CHARS

        if value is not None and len(value.get_secret_value()) < MIN_KEY_CHARS:
            raise ValueError(f"the signing key must be at least {MIN_KEY_CHARS} characters")
        return value or None

    @field_validator("signing_key_file")
    @classmethod
    def _check_signing_key_file(cls, value: str, info) -> str:
        if value and info.data.get("signing_key") is not None:
            raise ValueError(f"set {ENV_PREFIX}SIGNING_KEY or {ENV_PREFIX}SIGNING_KEY_FILE, not both")
        return value

    @model_validator(mode="after")
    def _read_signing_key_file(self) -> Settings:
        if self.signing_key_file and self.signing_key is None:
            self.signing_key = SecretStr(read_key_file(self.signing_key_file))
        return self

    @field_validator("allowed_backends")
    @classmethod
    def _check_allowed_backends(cls, value: str) -> str:
        from pixelrelay.pipeline.stages.registry import parse_allowlist, stage_of

        for entry in parse_allowlist(value) or ():
            if stage_of(entry.kind) is None:
                raise ValueError(f"unknown backend kind {entry.kind!r} in {str(entry)!r}")
        return value.strip()

    @field_validator("log_level")
    @classmethod
    def _check_log_level(cls, value: str) -> str:
        value = value.upper()
        if value not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return value

    @model_validator(mode="after")
    def _check_visibility_timeout(self) -> Settings:
        least = self.min_visibility_s()
        if self.visibility_timeout_s is not None and self.visibility_timeout_s <= least:
            raise ValueError(
                f"{ENV_PREFIX}VISIBILITY_TIMEOUT_S={self.visibility_timeout_s} is not longer than two leases and "
                f"a minute ({least:.0f} s: 2 x {ENV_PREFIX}LEASE_S + 60), so Redis could deliver a message "
                "twice between two renewals of its lease: raise it, or unset it"
            )
        return self

    def min_visibility_s(self) -> float:
        """The shortest visibility timeout allowed: two leases and a minute (a renewed lease
        moves its message's delivery time to now at least once a lease)."""
        return 2 * self.lease_s + 60

    def longest_batch_s(self) -> float:
        """The longest a chunk of a job without an item budget in its spec may run at this
        worker: ``item_budget_s x chunk_size`` plus two leases and a minute (Celery's hard
        time limit for such a chunk, ``workers.celery_app.time_limits``)."""
        return self.item_budget_s * self.chunk_size + 2 * self.lease_s + 60

    def visibility_s(self) -> int:
        """The broker's visibility timeout: the one set, else ``DEFAULT_VISIBILITY_TIMEOUT_S``
        (kombu delivers again an unacked message whose lease nobody renewed for that long; the
        sweep, not this, recovers a dead worker's chunk)."""
        if self.visibility_timeout_s is not None:
            return self.visibility_timeout_s
        return C.DEFAULT_VISIBILITY_TIMEOUT_S

    @classmethod
    def defaults(cls) -> Settings:
        """The declared defaults, ignoring the environment (what a backend built without
        settings uses: backends never read the environment themselves)."""
        return cls.model_construct()

    @classmethod
    def from_env(cls, naming: Literal["flag", "argument"] = "flag", /, **overrides: Any) -> Settings:
        """Build from the environment plus explicit overrides (None values are ignored). A bad
        override is named as a CLI flag (``--chunk-size``) or, with ``naming="argument"``, as
        a keyword argument (``chunk_size=``); a bad variable by its name."""
        warn_unknown_env()
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                if not err["loc"]:  # a model-level check: its message names the setting
                    problems.append(str(err.get("ctx", {}).get("error", err["msg"])))
                    continue
                name = str(err["loc"][0])
                problems.append(f"{_source(name, name in given, naming)}: {err['msg']}")
            raise ConfigError("bad setting: " + "; ".join(problems)) from None

    def signer(self):
        """The ``Signer`` of this configuration: keyed, or insecure only when allowed
        (``MissingSigningKey`` otherwise)."""
        from pixelrelay.pipeline.signing import Signer

        if self.signing_key is not None:
            return Signer(self.signing_key.get_secret_value())
        if self.insecure_no_signing:
            return Signer.insecure()
        raise MissingSigningKey(
            f"no signing key: set {ENV_PREFIX}SIGNING_KEY (the key) or {ENV_PREFIX}SIGNING_KEY_FILE (a file "
            "holding it), the same on every worker and producer, or pass --insecure-no-signing"
        )

    @property
    def redis(self) -> str:
        return self.redis_url.get_secret_value()

    @property
    def redacted_redis_url(self) -> str:
        return redact_url(self.redis)


def _source(name: str, given: bool, naming: str) -> str:
    """How a user set field ``name``: its flag or keyword argument when given, else its variable."""
    if not given:
        return ENV_PREFIX + name.upper()
    return name if naming == "argument" else "--" + name.replace("_", "-")


def known_env() -> frozenset[str]:
    """Every ``PIXELRELAY_*`` variable pixelrelay reads."""
    return frozenset(ENV_PREFIX + name.upper() for name in Settings.model_fields) | OTHER_ENV


def unknown_env(environ: Mapping[str, str]) -> list[tuple[str, str | None]]:
    """``(variable, nearest known name or None)`` for each ``PIXELRELAY_*`` variable in
    ``environ`` that pixelrelay does not read; values are never looked at."""
    known = {name.removeprefix(ENV_PREFIX): name for name in known_env()}
    found = sorted(name for name in environ if name.upper().startswith(ENV_PREFIX) and name.upper() not in known_env())
    return [(name, _nearest(name.upper().removeprefix(ENV_PREFIX), known)) for name in found]


def _nearest(suffix: str, known: dict[str, str]) -> str | None:
    near = difflib.get_close_matches(suffix, known, n=1, cutoff=0.75)
    return known[near[0]] if near else None


def warn_unknown_env() -> None:
    """Log a warning for each unknown ``PIXELRELAY_*`` variable, once per process."""
    global _env_checked
    if _env_checked:
        return
    _env_checked = True
    for name, near in unknown_env(os.environ):
        hint = f"; did you mean {near}?" if near else ""
        _log.warning("%s is not a pixelrelay setting and is ignored%s", name, hint)


def read_key_file(path: str) -> str:
    """The signing key held in ``path`` (one trailing newline dropped)."""
    from pixelrelay.pipeline.signing import MIN_KEY_CHARS

    try:
        with open(path, encoding="utf-8") as f:
            key = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ValueError(f"{ENV_PREFIX}SIGNING_KEY_FILE: cannot read {path}: {reason}") from None
    key = key[:-1] if key.endswith("\n") else key
    key = key[:-1] if key.endswith("\r") else key
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"{ENV_PREFIX}SIGNING_KEY_FILE: the key in {path} must be at least {MIN_KEY_CHARS} characters")
    return key


def check_unix_url(url: str) -> None:
    """A ``unix://[:PASSWORD@]/absolute/path[?db=N]`` URL (redis-py's spelling), or ValueError."""
    parts = urlsplit(url)
    if parts.hostname or parts.port or not parts.path.startswith("/") or parts.fragment:
        raise ValueError("a unix:// URL is unix:///absolute/path/to/socket (or unix://:PASSWORD@/absolute/path)")
    query = parse_qs(parts.query, keep_blank_values=True)
    if set(query) - {"db"} or any(not v.isdigit() for v in query.get("db", [])) or len(query.get("db", [])) > 1:
        raise ValueError("a unix:// URL takes one query parameter only, ?db=N (a number)")


def redact_url(url: str) -> str:
    """Hide any password in a URL, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.username:
        netloc = f"{parts.username}:***@{netloc}"
    else:
        netloc = f":***@{netloc}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
