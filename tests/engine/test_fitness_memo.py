"""engine.search.memo: keys that change with everything a loss depends on, a SQLite store that
refuses foreign files and takes concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3

import pytest
import torch

from engine.search.memo import FitnessMemo, FitnessMemoError, arch_text, model_key, tasks_key
from engine.space import SearchSpace


def _state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 1, 3, 3, generator=generator),
        "lslr": torch.full((3,), 0.1),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _slice(seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.rand(5, 1, 8, 8, generator=generator), torch.arange(5), torch.rand(5, 1, 8, 8, generator=generator),
         torch.arange(5))
        for _ in range(3)
    ]  # fmt: skip


def test_model_key_changes_with_any_weight_bit_the_device_and_nothing_else():
    state = _state()
    key = model_key(state, "cpu")
    assert key == model_key({name: value.clone() for name, value in reversed(state.items())}, "cpu")
    assert key != model_key(state, "cuda")
    nudged = _state()
    nudged["lslr"][1] = torch.nextafter(nudged["lslr"][1], torch.tensor(1.0))  # one bit of one rate
    assert key != model_key(nudged, "cpu")
    renamed = {("x." + name): value for name, value in _state().items()}
    assert key != model_key(renamed, "cpu")
    assert key != model_key({**_state(), "lslr": _state()["lslr"].double()}, "cpu")


def test_tasks_key_changes_with_one_pixel_a_label_the_order_and_the_metric():
    tasks = _slice()
    key = tasks_key(tasks)
    assert key == tasks_key(_slice())
    assert key != tasks_key(tasks, "error")
    pixel = _slice()
    pixel[2][2][4, 0, 7, 7] += 1e-3
    assert key != tasks_key(pixel)
    label = _slice()
    label[0] = (label[0][0], label[0][1].flip(0), label[0][2], label[0][3])
    assert key != tasks_key(label)
    assert key != tasks_key(list(reversed(tasks)))
    assert key != tasks_key(tasks[:2])


def test_losses_round_trip_and_rows_of_another_model_or_slice_are_not_seen(tmp_path):
    space = SearchSpace.vgg9(in_channels=1, image_size=28, num_classes=5)
    small, large = arch_text(space.smallest()), arch_text(space.largest())
    memo = FitnessMemo(tmp_path / "memo.sqlite", "model-a")
    assert memo.get_many([("slice-0", small)]) == {}
    memo.put_many([("slice-0", small, 1.25), ("slice-0", large, float("inf")), ("slice-1", small, 2.5)])
    memo.put_many([("slice-0", small, 9.0)])  # a second writer of the same row keeps the first
    again = FitnessMemo(tmp_path / "memo.sqlite", "model-a")  # a new job opening the same file
    assert again.get_many([("slice-0", small), ("slice-0", large), ("slice-1", large)]) == {
        ("slice-0", small): 1.25,
        ("slice-0", large): float("inf"),
    }
    assert again.count() == 3
    other = FitnessMemo(tmp_path / "memo.sqlite", "model-b")
    assert other.get_many([("slice-0", small)]) == {} and other.count() == 0


def test_many_keys_are_read_in_chunks(tmp_path):
    memo = FitnessMemo(tmp_path / "memo.sqlite", "m")
    rows = [("s", f"arch-{index}", float(index)) for index in range(1_234)]
    memo.put_many(rows)
    found = memo.get_many([(tasks, arch) for tasks, arch, _ in rows] + [("s", "unknown")])
    assert found == {(tasks, arch): loss for tasks, arch, loss in rows}


def test_a_file_that_is_not_a_memo_is_refused_and_left_alone(tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("my notes, not a database\n" * 100)
    with pytest.raises(FitnessMemoError, match="not a fitness memo"):
        FitnessMemo(text, "m")
    assert text.read_text().startswith("my notes")
    other_db = tmp_path / "other.sqlite"
    with sqlite3.connect(other_db) as connection:
        connection.execute("CREATE TABLE memo_format (format TEXT)")
        connection.execute("INSERT INTO memo_format VALUES ('something-else/3')")
    with pytest.raises(FitnessMemoError, match="something-else/3"):
        FitnessMemo(other_db, "m")
    folder = tmp_path / "a-folder"
    folder.mkdir()
    with pytest.raises(FitnessMemoError):
        FitnessMemo(folder, "m")


def _write_rows(path: str, worker: int) -> None:
    memo = FitnessMemo(path, "shared-model")
    for batch in range(20):
        # Rows 0-49 of every batch are written by both workers (the same evaluations), the rest by one.
        memo.put_many(
            [("slice", f"arch-{batch}-{index}", float(index)) for index in range(50)]
            + [("slice", f"arch-{batch}-w{worker}-{index}", float(worker)) for index in range(50)]
        )


def test_two_jobs_writing_at_once_keep_every_row(tmp_path):
    path = str(tmp_path / "memo.sqlite")
    FitnessMemo(path, "shared-model")
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_write_rows, args=(path, worker)) for worker in (1, 2)]
    for process in workers:
        process.start()
    for process in workers:
        process.join(60)
    assert [process.exitcode for process in workers] == [0, 0]
    assert FitnessMemo(path, "shared-model").count() == 20 * (50 + 50 + 50)
