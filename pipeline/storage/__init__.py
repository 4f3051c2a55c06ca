"""Storage backends behind one small interface: ``s3://bucket/prefix`` or a local path."""

from pixelrelay.pipeline.storage.base import (
    ObjectHead,
    PutRequest,
    Storage,
    StorageAccessError,
    StorageConflictError,
    StorageError,
    StorageEscapeError,
    StorageFullError,
    StorageNotFoundError,
    TransientStorageError,
    content_type_for,
    is_s3,
    join_uri,
    open_storage,
    os_error,
    split_uri,
)

__all__ = [
    "ObjectHead",
    "PutRequest",
    "Storage",
    "StorageAccessError",
    "StorageConflictError",
    "StorageError",
    "StorageEscapeError",
    "StorageFullError",
    "StorageNotFoundError",
    "TransientStorageError",
    "content_type_for",
    "is_s3",
    "join_uri",
    "open_storage",
    "os_error",
    "split_uri",
]
