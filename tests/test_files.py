"""Files written whole: replaced at the end of the block, untouched (and no temporary left) when it fails."""

from __future__ import annotations

import os

import pytest

from sparse_vdit.files import write_text_whole, written_whole


def test_a_file_is_replaced_whole_in_a_new_folder(tmp_path):
    path = tmp_path / "new" / "table.json"
    assert write_text_whole(path, "first\n") == path and path.read_text() == "first\n"
    with written_whole(path) as tmp:
        assert tmp.parent == path.parent and tmp != path and str(os.getpid()) in tmp.name
        tmp.write_text("second\n")
        assert path.read_text() == "first\n"  # readers see the old file until the block ends
    assert path.read_text() == "second\n" and sorted(p.name for p in path.parent.iterdir()) == ["table.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="stopped"):
        with written_whole(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
