"""Outputs: atomic files, and --force that replaces dsfuse's own outputs and never deletes anything else."""

from __future__ import annotations

import pytest

from dsfuse.errors import UsageError
from dsfuse.io import OUTPUT_MARKER, atomic_path, claim_output_folder


def test_force_replaces_only_a_folder_dsfuse_made(tmp_path):
    ours = claim_output_folder(tmp_path / "ours", force=False)
    (ours / "clip.wav").write_bytes(b"old")
    with pytest.raises(UsageError, match="not empty; pass --force"):
        claim_output_folder(ours, force=False)
    claim_output_folder(ours, force=True)
    assert [p.name for p in ours.iterdir()] == [OUTPUT_MARKER]

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(UsageError, match="did not write"):
        claim_output_folder(theirs, force=True)
    assert (theirs / "thesis.tex").read_text() == "years of work"

    (tmp_path / "a-file").write_text("x")
    with pytest.raises(UsageError, match="is a file, not a folder"):
        claim_output_folder(tmp_path / "a-file", force=True)


def test_a_failed_write_leaves_no_temporary(tmp_path):
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "out.txt") as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []
