"""Local storage's group commit (``storage.local``: ``put_many``): every request of a group
is tried on its own, the bytes are synced before any name points at them, and a process
killed at any step leaves only complete outputs (with their own metadata) or none.

A power cut cannot be simulated here; what is checked is the order of the steps (names
appear only after the sync, the folders are synced after the names) and SIGKILL between
them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from pixelrelay.pipeline.storage import PutRequest, StorageConflictError, StorageEscapeError, local
from pixelrelay.pipeline.storage.local import LocalStorage, sidecar_path


def _requests(folder, n, **kw) -> list[PutRequest]:
    return [
        PutRequest(str(folder / f"o{i}.png"), f"bytes {i}".encode() * 50, metadata={"i": str(i)}, **kw)
        for i in range(n)
    ]


def test_each_request_of_a_group_is_tried_on_its_own(tmp_path):
    root = tmp_path / "out"
    (root / "taken.png").parent.mkdir(parents=True)
    (root / "taken.png").write_bytes(b"there first")
    (root / "a-file").write_bytes(b"not a folder")
    requests = [
        *_requests(root, 3, if_absent=True),
        PutRequest(str(root / "taken.png"), b"loser", if_absent=True),  # exists: conflict
        PutRequest(str(tmp_path / "elsewhere.png"), b"x"),  # outside the root: refused
        PutRequest(str(root / "a-file" / "x.png"), b"x"),  # its folder is a file: an error
        PutRequest(str(root / "sub" / "deep.png"), b"deep", metadata={"k": "v"}),
    ]
    outcomes = LocalStorage(str(root)).put_many(requests)
    assert [type(o).__name__ if o else None for o in outcomes] == [
        None,
        None,
        None,
        "StorageConflictError",
        "StorageEscapeError",
        "StorageError",
        None,
    ]
    assert isinstance(outcomes[3], StorageConflictError) and isinstance(outcomes[4], StorageEscapeError)
    storage = LocalStorage()
    for r in requests[:3] + requests[-1:]:
        assert storage.get(r.uri) == r.data and storage.head(r.uri).metadata == r.metadata
    assert (root / "taken.png").read_bytes() == b"there first"
    assert not (tmp_path / "elsewhere.png").exists()
    assert not [p for p in root.rglob(".pixelrelay-*")], "temp files left behind"


def test_names_appear_only_after_the_bytes_are_synced(tmp_path, monkeypatch):
    """One syncfs for the group, before any rename or link; each named folder fsynced after."""
    steps = []
    real_sync, real_fsync = local._make_durable, local._fsync_path

    def make_durable(group):
        steps.append(("sync", sorted(os.listdir(tmp_path))))
        real_sync(group)

    def fsync_path(path):
        steps.append(("fsync", path, sorted(os.listdir(path)) if os.path.isdir(path) else None))
        real_fsync(path)

    calls = []
    syncfs = local._syncfs()
    assert syncfs is not None, "Linux has syncfs"
    monkeypatch.setattr(local, "_make_durable", make_durable)
    monkeypatch.setattr(local, "_fsync_path", fsync_path)
    monkeypatch.setattr(local, "_syncfs", lambda: lambda fd: calls.append(fd) or syncfs(fd))
    requests = _requests(tmp_path, 16, if_absent=True)
    assert LocalStorage().put_many(requests) == [None] * 16
    names = [os.path.basename(r.uri) for r in requests]
    sync = steps[0]
    assert sync[0] == "sync" and not set(names) & set(sync[1]), "a name existed before the sync"
    assert len([n for n in sync[1] if n.startswith(".pixelrelay-")]) == 32  # bytes + metadata, staged
    assert len(calls) == 1, "one syncfs for the whole group"
    [folder_sync] = steps[1:]
    assert folder_sync[:2] == ("fsync", str(tmp_path)) and set(names) <= set(folder_sync[2])


def test_a_group_of_one_or_a_system_without_syncfs_fsyncs_each_file(tmp_path, monkeypatch):
    fsynced = []
    real = local._fsync_path
    monkeypatch.setattr(local, "_fsync_path", lambda p: fsynced.append(p) or real(p))
    LocalStorage().put(str(tmp_path / "one.png"), b"1")
    assert len(fsynced) == 2 and fsynced[-1] == str(tmp_path)  # the temp file, then the folder
    fsynced.clear()
    monkeypatch.setattr(local, "_syncfs", lambda: None)
    assert LocalStorage().put_many(_requests(tmp_path, 3)) == [None] * 3
    assert len(fsynced) == 3 * 2 + 1  # bytes and metadata of each, then the folder


def test_a_failed_sync_names_nothing_and_leaves_no_temp_file(tmp_path, monkeypatch):
    def failing(group):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(local, "_make_durable", failing)
    outcomes = LocalStorage().put_many(_requests(tmp_path, 4))
    assert all(o is not None and "Input/output error" in str(o) for o in outcomes)
    assert os.listdir(tmp_path) == []


def test_replacing_keeps_the_sidecar_invariant(tmp_path):
    storage = LocalStorage()
    uri = str(tmp_path / "r.png")
    storage.put(uri, b"old", metadata={"v": "old"})
    version = storage.head(uri).version
    [ok] = storage.put_many([PutRequest(uri, b"new", if_version=version)])  # no metadata this time
    assert ok is None and storage.get(uri) == b"new"
    assert storage.head(uri).metadata == {} and not os.path.exists(sidecar_path(uri))
    [lost] = storage.put_many([PutRequest(uri, b"newer", metadata={"v": "x"}, if_version=version)])
    assert isinstance(lost, StorageConflictError) and storage.get(uri) == b"new"


_KILLED_AT = textwrap.dedent("""
    import json, os, signal, sys
    from pixelrelay.pipeline.storage import PutRequest, local
    folder, step = sys.argv[1], sys.argv[2]
    requests = [PutRequest(os.path.join(folder, f"o{i}.png"), f"bytes {i}".encode() * 200,
                           metadata={"i": str(i)}, if_absent=True) for i in range(8)]
    if step == "sync":
        local._make_durable = lambda group: os.kill(os.getpid(), signal.SIGKILL)
    else:
        real, done = local._Staged.commit, []
        def commit(self):
            if len(done) == 3:
                os.kill(os.getpid(), signal.SIGKILL)
            real(self)
            done.append(self)
        local._Staged.commit = commit
    local.LocalStorage(folder).put_many(requests)
""")


@pytest.mark.parametrize("step", ["sync", "commit"])
def test_a_writer_killed_mid_group_leaves_complete_outputs_or_none(tmp_path, step):
    proc = subprocess.run([sys.executable, "-c", _KILLED_AT, str(tmp_path), step], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    storage = LocalStorage()
    outputs = sorted(p for p in os.listdir(tmp_path) if not p.startswith("."))
    assert outputs == ([] if step == "sync" else ["o0.png", "o1.png", "o2.png"])
    for name in outputs:
        i = name[1:-4]
        assert storage.get(str(tmp_path / name)) == f"bytes {i}".encode() * 200
        assert json.loads(open(sidecar_path(str(tmp_path / name))).read()) == {"i": i}
    hidden = {p for p in os.listdir(tmp_path) if p.startswith(".")}  # input listings skip hidden files
    leftovers = hidden - {os.path.basename(sidecar_path(str(tmp_path / n))) for n in outputs}
    assert all(p.startswith(".pixelrelay-") and p.endswith(".part") for p in leftovers), leftovers
    # The group written again completes it: the outputs already there conflict, untouched.
    outcomes = LocalStorage(str(tmp_path)).put_many(_requests_like_the_child(tmp_path))
    assert [o is None for o in outcomes] == [f"o{i}.png" not in outputs for i in range(8)]


def _requests_like_the_child(folder) -> list[PutRequest]:
    return [
        PutRequest(str(folder / f"o{i}.png"), f"bytes {i}".encode() * 200, metadata={"i": str(i)}, if_absent=True)
        for i in range(8)
    ]


def test_an_s3_group_is_put_concurrently_each_request_on_its_own(s3_bucket, monkeypatch):
    import threading
    import time

    from pixelrelay.pipeline.storage import open_storage
    from pixelrelay.pipeline.storage.s3 import S3Storage

    storage = open_storage(f"s3://{s3_bucket}/g")
    storage.put(f"s3://{s3_bucket}/g/taken.png", b"there first")
    threads = set()
    real = S3Storage.put

    def put(self, *args, **kw):
        threads.add(threading.current_thread().name)
        time.sleep(0.05)  # long enough that the group's PUTs overlap
        return real(self, *args, **kw)

    monkeypatch.setattr(S3Storage, "put", put)
    requests = [
        PutRequest(f"s3://{s3_bucket}/g/{i}.png", f"b{i}".encode(), metadata={"i": str(i)}, if_absent=True)
        for i in range(6)
    ]
    requests.append(PutRequest(f"s3://{s3_bucket}/g/taken.png", b"loser", if_absent=True))
    outcomes = storage.put_many(requests)
    assert outcomes[:6] == [None] * 6 and isinstance(outcomes[6], StorageConflictError)
    assert len(threads) > 1, "the PUTs ran one after another"
    for r in requests[:6]:
        assert storage.get(r.uri) == r.data and storage.head(r.uri).metadata == r.metadata
    assert storage.get(f"s3://{s3_bucket}/g/taken.png") == b"there first"
