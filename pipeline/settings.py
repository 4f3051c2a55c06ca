"""Typed settings: flags override the environment (``PIXELRELAY_*``), which overrides defaults.

``Settings.from_env`` fails fast with ``ConfigError`` naming the bad variable. The Redis URL
may carry a password: it is a SecretStr and ``redacted_redis_url`` is the only form logged.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pixelrelay.pipeline import constants as C

ENV_PREFIX = "PIXELRELAY_"
_DEVICE_RE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A bad setting; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore", validate_default=True)

    redis_url: SecretStr = SecretStr(C.DEFAULT_REDIS_URL)
    s3_endpoint_url: str | None = None
    max_image_pixels: int = Field(C.DEFAULT_MAX_IMAGE_PIXELS, ge=1)
    chunk_size: int = Field(C.DEFAULT_CHUNK_SIZE, ge=1, le=4096)
    window: int = Field(C.DEFAULT_WINDOW, ge=1)
    batch_size: int = Field(C.DEFAULT_BATCH_SIZE, ge=1, le=1024)
    visibility_timeout_s: int = Field(C.DEFAULT_VISIBILITY_TIMEOUT_S, ge=1)
    max_retries: int = Field(C.DEFAULT_MAX_RETRIES, ge=0, le=100)
    max_deliveries: int = Field(C.DEFAULT_MAX_DELIVERIES, ge=1, le=100)
    device: str = "cpu"
    io_threads: int = Field(4, ge=1, le=256)  # storage + image codec threads per worker process
    torch_threads: int = Field(0, ge=0, le=1024)  # 0: torch's default
    encoder: str = C.DEFAULT_ENCODER
    planner: str = C.DEFAULT_PLANNER
    decoder: str = C.DEFAULT_DECODER
    # Backend specs this process may build besides its own encoder/planner/decoder and their
    # variants (``stages.registry.spec_allowed``): blank/comma-separated, ``*`` = anything.
    # ``submit`` refuses local-path specs unless this allows them.
    allowed_backends: str = ""
    log_level: str = "INFO"
    # Learned models: precision on GPU (CPU is always fp32). Learned decoders' tiled
    # inference: one TILE/_OVERLAP/_TILE_BATCH/_MIN_TILE set per decoder (builtin, sr, sd).
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    builtin_tile: int = Field(256, ge=16)
    builtin_overlap: int = Field(32, ge=0)
    builtin_tile_batch: int = Field(8, ge=1)
    builtin_min_tile: int = Field(32, ge=8)
    sr_tile: int = Field(256, ge=16)
    sr_overlap: int = Field(32, ge=0)
    sr_tile_batch: int = Field(4, ge=1)
    sr_min_tile: int = Field(32, ge=8)
    sd_tile: int = Field(128, ge=16)
    sd_overlap: int = Field(32, ge=0)
    sd_tile_batch: int = Field(2, ge=1)
    sd_min_tile: int = Field(32, ge=8)
    sd_steps: int = Field(25, ge=1, le=1000)
    sd_guidance: float = Field(7.5, ge=0.0, le=50.0)
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

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: SecretStr) -> SecretStr:
        raw = value.get_secret_value()
        if raw and urlsplit(raw).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL (or empty for the embedded server)")
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

    @classmethod
    def defaults(cls) -> "Settings":
        """The declared defaults, ignoring the environment (what a backend built without
        settings uses: backends never read the environment themselves)."""
        return cls.model_construct()

    @classmethod
    def from_env(cls, **overrides: Any) -> "Settings":
        """Build from the environment plus explicit overrides (None values are ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        try:
            return cls(**given)
        except ValidationError as exc:
            problems = []
            for err in exc.errors():
                name = str(err["loc"][0]) if err["loc"] else "?"
                source = "--" + name.replace("_", "-") if name in given else ENV_PREFIX + name.upper()
                problems.append(f"{source}: {err['msg']}")
            raise ConfigError("bad setting: " + "; ".join(problems)) from None

    @property
    def redis(self) -> str:
        return self.redis_url.get_secret_value()

    @property
    def redacted_redis_url(self) -> str:
        return redact_url(self.redis)


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
