"""S3-compatible storage (AWS S3, MinIO, Ceph, R2) through boto3.

Credentials come from the standard AWS chain; ``S3Options`` sets the endpoint, checksums
(``when_required``: many S3-compatible stores reject botocore's default CRC), botocore's own
retries and server-side encryption. Errors map to ``StorageError`` or
``TransientStorageError``, a failed condition (412, 409; 404 for If-Match) to
``StorageConflictError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from pixelrelay.pipeline.storage.base import (
    ObjectHead,
    ObjectInfo,
    PutRequest,
    Storage,
    StorageConflictError,
    StorageError,
    StorageNotFoundError,
    TransientStorageError,
    content_type_for,
    split_uri,
)

# Error codes worth retrying, as S3 and the S3-compatible stores send them (botocore's
# standard retry mode retries the same; MinIO sends SlowDownRead/SlowDownWrite).
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "SlowDownRead",
    "SlowDownWrite",
    "RequestTimeout",
    "RequestTimeoutException",
    "RequestTimeTooSkewed",
    "PriorRequestNotComplete",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "BandwidthLimitExceeded",
    "OperationAborted",  # a conflicting operation on the bucket is in progress
}
_TRANSIENT_STATUS = {408, 429}  # plus every 5xx
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# A conditional PUT lost: the object exists (412), or another conditional write to the key
# is in flight (409 ConditionalRequestConflict).
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
# Connection refused/reset/closed, timeouts, a response body cut short.
_NETWORK_ERRORS = (BotoConnectionError, HTTPClientError, IncompleteReadError)

# Requests that write an object: server-side encryption is added to each.
_WRITE_OPERATIONS = ("PutObject", "CreateMultipartUpload", "CopyObject")


@dataclasses.dataclass(frozen=True)
class S3Options:
    """How the S3 client is built; ``from_settings`` reads the ``PIXELRELAY_S3_*`` settings."""

    endpoint_url: str | None = None
    checksums: str = "when_required"  # request_checksum_calculation / response_checksum_validation
    retry_mode: str = "standard"
    max_attempts: int = 4  # the first request included
    sse: str = ""  # "", "AES256" or "aws:kms"
    sse_kms_key_id: str = ""

    @classmethod
    def from_settings(cls, settings: Any, endpoint_url: str | None = None) -> S3Options:
        return cls(
            endpoint_url=endpoint_url or settings.s3_endpoint_url or None,
            checksums=settings.s3_checksums,
            retry_mode=settings.s3_retry_mode,
            max_attempts=settings.s3_max_attempts,
            sse=settings.s3_sse,
            sse_kms_key_id=settings.s3_sse_kms_key_id,
        )

    def config(self) -> Config:
        return Config(
            retries={"total_max_attempts": self.max_attempts, "mode": self.retry_mode},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
            request_checksum_calculation=self.checksums,
            response_checksum_validation=self.checksums,
        )

    def sse_params(self) -> dict[str, str]:
        if not self.sse:
            return {}
        params = {"ServerSideEncryption": self.sse}
        if self.sse_kms_key_id:
            params["SSEKMSKeyId"] = self.sse_kms_key_id
        return params


@functools.lru_cache(maxsize=8)
def _options_from_env(env: frozenset[tuple[str, str]]) -> S3Options:  # cached per environment
    from pixelrelay.pipeline.settings import Settings

    return S3Options.from_settings(Settings.from_env())  # ConfigError names a bad setting


def env_options() -> S3Options:
    """``S3Options`` from the environment's ``PIXELRELAY_*`` settings (validated)."""
    return _options_from_env(frozenset((k, v) for k, v in os.environ.items() if k.startswith("PIXELRELAY_")))


def _map_error(exc: Exception, uri: str) -> Exception:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES:
            return StorageNotFoundError(f"no such object: {uri}")
        if code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS or status >= 500:
            return TransientStorageError(f"S3 {code or status} (HTTP {status}) for {uri}")
        return StorageError(f"S3 {code or status} (HTTP {status}) for {uri}")
    if isinstance(exc, (*_NETWORK_ERRORS, ConnectionError, TimeoutError)):
        return TransientStorageError(f"S3 connection problem for {uri}: {type(exc).__name__}")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"S3 client error for {uri}: {exc}")
    return exc


def _is_conflict(exc: ClientError, missing_is_conflict: bool = False) -> bool:
    """A lost conditional PUT; with If-Match, a vanished object (404) is one too."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if missing_is_conflict and (code in _NOT_FOUND_CODES or status == 404):
        return True
    return code in _CONFLICT_CODES or status in (409, 412)


def _content_type_args(uri: str, content_type: str | None) -> dict[str, str]:
    content_type = content_type or content_type_for(uri)
    return {"ContentType": content_type} if content_type else {}


def _add_sse(params: dict[str, Any], sse: dict[str, str], **_: Any) -> None:
    for name, value in sse.items():
        params.setdefault(name, value)


PUT_CONCURRENCY = 8  # the PUTs of one put_many group in flight at once (the client pools 32)


class S3Storage(Storage):
    _clients: dict[tuple[int, S3Options], S3Storage] = {}
    _lock = threading.Lock()

    def __init__(self, endpoint_url: str | None = None, options: S3Options | None = None) -> None:
        """A client built from ``options`` (the defaults when None: no environment is read)."""
        options = options or S3Options()
        if endpoint_url:
            options = dataclasses.replace(options, endpoint_url=endpoint_url)
        self.options = options
        self.client = boto3.session.Session().client("s3", endpoint_url=options.endpoint_url, config=options.config())
        sse = options.sse_params()
        if sse:
            for operation in _WRITE_OPERATIONS:
                self.client.meta.events.register(
                    f"before-parameter-build.s3.{operation}", functools.partial(_add_sse, sse=sse)
                )
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)

    @classmethod
    def shared(cls, endpoint_url: str | None = None, settings: Any = None) -> S3Storage:
        """One client per process and configuration: ``settings`` (a ``Settings``), else the
        environment's; ``endpoint_url`` overrides the endpoint they name."""
        options = S3Options.from_settings(settings) if settings is not None else env_options()
        if endpoint_url:
            options = dataclasses.replace(options, endpoint_url=endpoint_url)
        key = (os.getpid(), options)  # keyed by pid too: a client must not cross a fork
        with cls._lock:
            if key not in cls._clients:
                cls._clients[key] = cls(options=options)
            return cls._clients[key]

    def get(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:
            raise _map_error(exc, uri) from None

    def iter_lines(self, uri: str) -> Iterator[bytes]:
        bucket, key = split_uri(uri)
        try:
            body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
            with contextlib.closing(body):
                for line in body.iter_lines(chunk_size=1 << 20):
                    yield line.rstrip(b"\r")
        except Exception as exc:
            raise _map_error(exc, uri) from None

    def put(
        self,
        uri: str,
        data: bytes,
        content_type: str | None = None,
        *,
        metadata: dict[str, str] | None = None,
        if_absent: bool = False,
        if_version: str | None = None,
    ) -> None:
        bucket, key = split_uri(uri)
        extra: dict = _content_type_args(uri, content_type)
        if metadata:
            extra["Metadata"] = dict(metadata)
        if if_absent:
            extra["IfNoneMatch"] = "*"
        elif if_version:
            extra["IfMatch"] = if_version
        try:
            self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        except ClientError as exc:
            if (if_absent or if_version) and _is_conflict(exc, missing_is_conflict=bool(if_version)):
                raise StorageConflictError(f"already exists: {uri}") from None
            raise _map_error(exc, uri) from None
        except Exception as exc:
            raise _map_error(exc, uri) from None

    def put_many(self, requests: Sequence[PutRequest]) -> list[Exception | None]:
        """The group's PUTs concurrently (up to ``PUT_CONCURRENCY``), each exactly as ``put``:
        S3 has nothing to commit together, and the latency of one PUT dominates its cost."""
        if len(requests) <= 1:
            return super().put_many(requests)
        with ThreadPoolExecutor(min(len(requests), PUT_CONCURRENCY), thread_name_prefix="pixelrelay-put") as pool:
            return list(pool.map(lambda r: Storage.put_many(self, [r])[0], requests))

    def head(self, uri: str) -> ObjectHead | None:
        bucket, key = split_uri(uri)
        try:
            response = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            mapped = _map_error(exc, uri)
            if isinstance(mapped, StorageNotFoundError):
                return None
            raise mapped from None
        metadata = {str(k).lower(): str(v) for k, v in (response.get("Metadata") or {}).items()}
        return ObjectHead(metadata, str(response.get("ETag") or ""))

    def put_file(self, uri: str, fileobj: BinaryIO, content_type: str | None = None) -> None:
        bucket, key = split_uri(uri)
        extra = _content_type_args(uri, content_type)
        try:
            self.client.upload_fileobj(fileobj, bucket, key, ExtraArgs=extra or None, Config=self.transfer)
        except Exception as exc:
            raise _map_error(getattr(exc, "last_exception", None) or exc, uri) from None

    def exists(self, uri: str) -> bool:
        bucket, key = split_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            mapped = _map_error(exc, uri)
            if isinstance(mapped, StorageNotFoundError):
                return False
            raise mapped from None

    def list(self, prefix: str) -> Iterator[str]:
        bucket, key_prefix = split_uri(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    yield f"s3://{bucket}/{obj['Key']}"
        except Exception as exc:
            raise _map_error(exc, prefix) from None

    def delete(self, uri: str) -> None:
        bucket, key = split_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:
            raise _map_error(exc, uri) from None

    def list_info(self, prefix: str) -> Iterator[ObjectInfo]:
        bucket, key_prefix = split_uri(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(
                        f"s3://{bucket}/{obj['Key']}",
                        int(obj["Size"]),
                        obj["LastModified"].timestamp(),
                        str(obj.get("ETag", "")).strip('"'),
                    )
        except Exception as exc:
            raise _map_error(exc, prefix) from None
