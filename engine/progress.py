"""Progress reporting from long engine jobs.

Engine functions take a ``progress`` callable and call it with plain dicts; the
engine never knows whether the receiver is a terminal bar, a test list or the
Channels layer of the dashboard (nasweb wraps the callable around group_send).

Every event has ``kind`` (e.g. ``"meta_train"``, ``"profile"``, ``"adapt"``),
``current`` and ``total`` (units of work done / to do, total may be ``None``)
and any JSON-serialisable extra fields the job wants to show.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

ProgressEvent = dict[str, Any]
ProgressCallback = Callable[[ProgressEvent], None]


class JobCancelled(Exception):
    """Raised from inside a progress callback to stop a job cleanly.

    Engine loops let it propagate after leaving their checkpoint consistent.
    """


def null_progress(event: ProgressEvent) -> None:
    """A progress callback that ignores everything."""


class ListProgress:
    """Collects events in memory (tests, benchmarks)."""

    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(dict(event))

    def of_kind(self, kind: str) -> list[ProgressEvent]:
        return [event for event in self.events if event.get("kind") == kind]
