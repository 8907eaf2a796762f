"""JSON text of immutable rows, encoded once per process and reused by list answers.

A finished adaption's Pareto front and an adapted model's REST representation never change after
they are written, yet the Compare page and ``/api/models/`` decoded, rebuilt and re-encoded them
on every poll (the largest share of those answers' time: 375 and 175 KiB). Lists still query
which rows to show - so names, permissions and new rows are always current - and take each row's
JSON text from here. Keys carry a version (a creation or finish time), so a reused id never
serves an old row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from django.core.cache import cache
from django.core.serializers.json import DjangoJSONEncoder


def _version(value: Any) -> str:
    return str(value.timestamp()) if hasattr(value, "timestamp") else str(value)


def cached_json(
    kind: str, rows: Sequence[tuple[Hashable, Any]], load: Callable[[list[Any]], Iterable[tuple[Any, Any]]]
) -> dict[Any, str]:
    """``{pk: JSON text}`` for ``rows`` of ``(pk, version)``; ``load(missing pks)`` yields ``(pk, value)``."""
    keys = {pk: f"nasweb:{kind}:{pk}:{_version(version)}" for pk, version in rows}
    found = cache.get_many(list(keys.values()))
    texts = {pk: found[key] for pk, key in keys.items() if key in found}
    missing = [pk for pk in keys if pk not in texts]
    if missing:
        fresh = {
            pk: json.dumps(value, cls=DjangoJSONEncoder, separators=(",", ":")) for pk, value in load(missing)
        }
        cache.set_many({keys[pk]: text for pk, text in fresh.items()}, timeout=None)
        texts.update(fresh)
    return texts
