"""S3-compatible storage (AWS S3, MinIO, Ceph, R2) through boto3.

Credentials come from the standard AWS chain (``AWS_*`` variables, profiles, roles); the
endpoint from ``PIXELRELAY_S3_ENDPOINT_URL`` for non-AWS services. Single objects are one
PUT; large files go through boto3's managed multipart upload, which is only visible once
completed. Errors are mapped to StorageError (permanent) or TransientStorageError (retry).
``put(..., if_absent=True)`` sends ``If-None-Match: *``, ``if_version=ETAG`` sends
``If-Match``; the 412 (or 409, a concurrent conditional write in flight; or 404 for
If-Match) becomes ``StorageConflictError``. Metadata is S3 user metadata.
"""

from __future__ import annotations

import os
import threading
from typing import BinaryIO, Iterator

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from pixelrelay.pipeline.storage.base import (
    ObjectHead,
    Storage,
    StorageConflictError,
    StorageError,
    StorageNotFoundError,
    TransientStorageError,
    content_type_for,
    split_uri,
)

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "503",
    "500",
}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
# A conditional PUT lost: the object exists (412), or another conditional write to the key
# is in flight (409 ConditionalRequestConflict).
_CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict"}
_NETWORK_ERRORS = (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError, ConnectionClosedError)


def _map_error(exc: Exception, uri: str) -> Exception:
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if code in _NOT_FOUND_CODES:
            return StorageNotFoundError(f"no such object: {uri}")
        if code in _TRANSIENT_CODES or status >= 500:
            return TransientStorageError(f"S3 {code or status} for {uri}")
        return StorageError(f"S3 {code or status} for {uri}")
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


class S3Storage(Storage):
    _clients: dict[tuple[int, str | None], "S3Storage"] = {}
    _lock = threading.Lock()

    def __init__(self, endpoint_url: str | None = None) -> None:
        config = Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=32,
        )
        self.client = boto3.session.Session().client("s3", endpoint_url=endpoint_url or None, config=config)
        self.transfer = TransferConfig(multipart_threshold=64 << 20, multipart_chunksize=64 << 20)

    @classmethod
    def shared(cls, endpoint_url: str | None = None) -> "S3Storage":
        # Keyed by pid too: a client must not cross a fork.
        key = (os.getpid(), endpoint_url or os.environ.get("PIXELRELAY_S3_ENDPOINT_URL") or None)
        with cls._lock:
            if key not in cls._clients:
                cls._clients[key] = cls(key[1])
            return cls._clients[key]

    def get(self, uri: str) -> bytes:
        bucket, key = split_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
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
