"""The MAC on ``--incremental`` index rows: it covers every field and the state folder."""

from __future__ import annotations

from pixelrelay.pipeline.signing import Signer
from pixelrelay.producer.incremental import MAC_FIELD, RowSigner, state_root

FIELDS = ("input", "version", "request", "done")
KIND = "incremental:index"


def test_a_row_verifies_only_unchanged_and_in_its_own_folder():
    signer = Signer("the job's signing key")
    rows = RowSigner(signer, state_root("/out", "/in"))
    row = rows.sign(KIND, {"input": "/in/a.png", "version": "1-2-3", "request": "r" * 64, "done": True})
    assert rows.valid(KIND, row, FIELDS)
    for name, value in (("input", "/in/b.png"), ("version", "1-2-4"), ("request", "s" * 64), ("done", False)):
        assert not rows.valid(KIND, {**row, name: value}, FIELDS)
    assert not rows.valid(KIND, {k: v for k, v in row.items() if k != MAC_FIELD}, FIELDS)
    assert not RowSigner(signer, state_root("/other-out", "/in")).valid(KIND, row, FIELDS)
    assert not rows.valid("incremental:sent", row, FIELDS)
    assert not RowSigner(Signer("another key entirely"), rows.root).valid(KIND, row, FIELDS)


def test_without_a_key_rows_are_unsigned_and_taken_as_they_are():
    rows = RowSigner(Signer.insecure(), state_root("/out", "/in"))
    row = {"input": "/in/a.png", "version": "1", "request": "r", "done": True}
    assert rows.sign(KIND, row) == row and rows.valid(KIND, row, FIELDS)
