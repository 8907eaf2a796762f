"""Few-shot losses kept across adaption requests (the fitness memo).

The GA's fitness of an architecture on a task slice (its mean query loss after the inner loop)
depends on the super-net's weights, the slice's tasks, where it is scored and this code. It does
*not* depend on the device whose latency table constrains the search, nor on the budget. A
deployment engineer asks for many devices and budgets with one super-net, so a second request
finds most of what its search looks at already scored by the first: H-Meta-NAS's promise of
"meta-train once, adapt per device cheaply" applied to the adaption itself.

Keys say exactly what a loss depends on, so a hit is the very number a fresh evaluation would give:

* ``model``: :func:`model_key`, a digest of the learner's tensors (weights, learned inner-loop
  rates, BatchNorm state), the scoring device, the torch version and :data:`FITNESS_VERSION`;
* ``tasks``: :func:`tasks_key`, a digest of one slice's task tensors (images and labels, after
  preprocessing) and what is scored on it (``"loss"``, ``"error"`` for a held-out slice whose
  final choice ranks by query error, ``"error-then-loss"`` for a search slice ranked by it),
  with ``@bfloat16`` where a search scores in that arithmetic;
* ``arch``: the canonical architecture's JSON.

Losses on one machine are bit-for-bit reproducible (one torch thread per evaluation, tests), so a
request run against a warm memo chooses exactly what it chooses against an empty one (tested).
Scores from another machine of the same device kind could differ in float rounding; the memo lives
beside the super-net's checkpoint on the server that scores, so that does not arise in practice.

Storage is one SQLite file (standard library; WAL mode, so concurrent adaption jobs of one
super-net read while another writes; ``INSERT OR IGNORE``, so two jobs that scored the same
architecture agree on one row). A connection is opened per call and never crosses a fork.
"""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "FITNESS_MEMO_NAME",
    "FITNESS_VERSION",
    "FitnessMemo",
    "FitnessMemoError",
    "arch_text",
    "model_key",
    "tasks_key",
]

#: Bump whenever a change to the scoring (``engine.search.adapt.SuperNetScorer``, the grouped or
#: vmapped paths, the inner loop) can change a loss, even in its last bit: old entries then stop
#: matching instead of silently mixing two computations in one search.
FITNESS_VERSION = 1
FORMAT = "nasweb-fitness-memo/1"
#: The memo's usual file name, beside the super-net's checkpoint (the dashboard's choice).
FITNESS_MEMO_NAME = "fitness-memo.sqlite"
#: Rows per SELECT (SQLite's default limit of host parameters is 32,766; this stays far below).
_CHUNK = 500
_BUSY_TIMEOUT_S = 60.0


class FitnessMemoError(ValueError):
    """The memo file cannot be used: not a fitness memo, unreadable, or not writable."""


def _digest() -> Any:
    return hashlib.blake2b(digest_size=20)


def _update_with_tensor(digest: Any, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().to("cpu").contiguous()
    digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
    # A byte view (not numpy), so every dtype - bfloat16 too - hashes its exact bits.
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())


def model_key(state: Mapping[str, torch.Tensor], device: str) -> str:
    """Digest of what the scorer computes with: ``state`` (a learner's ``state_dict()``) and where."""
    digest = _digest()
    digest.update(f"{FITNESS_VERSION}|{torch.__version__}|{device}|".encode())
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            _update_with_tensor(digest, name, value)
        else:  # e.g. a step counter kept as a plain number
            digest.update(f"{name}={value!r}|".encode())
    return digest.hexdigest()


def tasks_key(tasks: Sequence[Sequence[torch.Tensor]], metric: str = "loss") -> str:
    """Digest of one slice: every task's ``(support_x, support_y, query_x, query_y)`` and ``metric``."""
    digest = _digest()
    digest.update(f"{metric}|{len(tasks)}|".encode())
    for index, task in enumerate(tasks):
        for part, tensor in zip(("sx", "sy", "qx", "qy"), task, strict=True):
            _update_with_tensor(digest, f"{index}.{part}", tensor)
    return digest.hexdigest()


def arch_text(arch: Any) -> str:
    """The memo's key of an architecture: its canonical JSON."""
    return arch.to_json() if hasattr(arch, "to_json") else json.dumps(arch, sort_keys=True)


class FitnessMemo:
    """Losses by ``(model, tasks, arch)`` in the SQLite file at ``path`` (created when missing).

    Only strings travel with the object (it is pickled into spawned search workers, which never
    use it): each call opens its own connection.
    """

    def __init__(self, path: str | Path, model: str) -> None:
        self.path = Path(path)
        self.model = model
        self._check()

    def _connect(self) -> sqlite3.Connection:
        try:
            connection = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S)
        except sqlite3.Error as error:
            raise FitnessMemoError(f"fitness memo {self.path}: cannot open ({error})") from None
        return connection

    def _check(self) -> None:
        """Create the file's tables, or refuse a file that is not a fitness memo."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with closing(self._connect()) as connection, connection:
                connection.execute("PRAGMA journal_mode=WAL")
                connection.execute("CREATE TABLE IF NOT EXISTS memo_format (format TEXT NOT NULL)")
                row = connection.execute("SELECT format FROM memo_format").fetchone()
                if row is None:
                    connection.execute("INSERT INTO memo_format VALUES (?)", (FORMAT,))
                elif row[0] != FORMAT:
                    raise FitnessMemoError(
                        f"fitness memo {self.path}: format {row[0]!r}, expected {FORMAT!r}"
                    )
                connection.execute(
                    "CREATE TABLE IF NOT EXISTS fitness (model TEXT NOT NULL, tasks TEXT NOT NULL, "
                    "arch TEXT NOT NULL, loss REAL, PRIMARY KEY (model, tasks, arch)) WITHOUT ROWID"
                )
        except sqlite3.DatabaseError as error:
            raise FitnessMemoError(f"fitness memo {self.path}: not a fitness memo file ({error})") from None
        except OSError as error:
            raise FitnessMemoError(f"fitness memo {self.path}: {error}") from None

    def get_many(self, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Known losses of ``(tasks key, arch text)`` pairs (see :func:`arch_text`); misses are absent."""
        by_tasks: dict[str, list[str]] = {}
        for tasks, arch in keys:
            by_tasks.setdefault(tasks, []).append(arch)
        found: dict[tuple[str, str], float] = {}
        try:
            with closing(self._connect()) as connection:
                for tasks, archs in by_tasks.items():
                    unique = list(dict.fromkeys(archs))
                    for start in range(0, len(unique), _CHUNK):
                        chunk = unique[start : start + _CHUNK]
                        rows = connection.execute(
                            "SELECT arch, loss FROM fitness WHERE model = ? AND tasks = ? AND arch IN "
                            f"({','.join('?' * len(chunk))})",
                            (self.model, tasks, *chunk),
                        )
                        for arch, loss in rows:
                            # SQLite stores no NaN (it reads back as NULL); an infinite loss survives.
                            found[(tasks, arch)] = math.nan if loss is None else float(loss)
        except sqlite3.Error as error:
            raise FitnessMemoError(f"fitness memo {self.path}: read failed ({error})") from None
        return found

    def put_many(self, items: Iterable[tuple[str, str, float]]) -> None:
        """Store ``(tasks key, arch text, loss)`` rows in one transaction (rows already there are kept)."""
        rows = [(self.model, tasks, arch, float(loss)) for tasks, arch, loss in items]
        if not rows:
            return
        try:
            with closing(self._connect()) as connection, connection:
                connection.executemany("INSERT OR IGNORE INTO fitness VALUES (?, ?, ?, ?)", rows)
        except sqlite3.Error as error:
            raise FitnessMemoError(f"fitness memo {self.path}: write failed ({error})") from None

    def count(self) -> int:
        """Rows of this memo's model (all task slices)."""
        try:
            with closing(self._connect()) as connection:
                return int(
                    connection.execute(
                        "SELECT COUNT(*) FROM fitness WHERE model = ?", (self.model,)
                    ).fetchone()[0]
                )
        except sqlite3.Error as error:
            raise FitnessMemoError(f"fitness memo {self.path}: read failed ({error})") from None
