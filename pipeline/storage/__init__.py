"""Storage backends behind one small interface: ``s3://bucket/prefix`` or a local path."""

from pixelrelay.pipeline.storage.base import (
    ObjectHead,
    Storage,
    StorageConflictError,
    StorageError,
    StorageNotFoundError,
    TransientStorageError,
    content_type_for,
    is_s3,
    join_uri,
    open_storage,
    split_uri,
)

__all__ = [
    "ObjectHead",
    "Storage",
    "StorageConflictError",
    "StorageError",
    "StorageNotFoundError",
    "TransientStorageError",
    "content_type_for",
    "is_s3",
    "join_uri",
    "open_storage",
    "split_uri",
]
