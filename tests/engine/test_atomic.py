"""engine.atomic: JSON written whole or not at all, indented for people or compact for state."""

from __future__ import annotations

import json

import pytest

from engine.atomic import atomic_write_json

STATE = {"cache": {"entries": [[{"depth": 2, "layers": [3, 1.5, "relu"]}, 0, 2.5]] * 50}, "generation": 7}


def test_compact_json_is_one_line_that_reads_back_equal_and_smaller(tmp_path):
    readable = atomic_write_json(tmp_path / "readable.json", STATE)
    compact = atomic_write_json(tmp_path / "compact.json", STATE, compact=True)

    assert json.loads(compact.read_text()) == json.loads(readable.read_text()) == STATE
    assert "\n" not in compact.read_text() and " " not in compact.read_text()
    assert readable.read_text().count("\n") > 50
    assert compact.stat().st_size * 2 < readable.stat().st_size


def test_a_write_that_fails_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = atomic_write_json(tmp_path / "state.json", STATE, compact=True)

    with pytest.raises(TypeError):
        atomic_write_json(target, {"generation": 8, "bad": object()}, compact=True)

    assert json.loads(target.read_text()) == STATE
    assert [path.name for path in tmp_path.iterdir()] == ["state.json"]
