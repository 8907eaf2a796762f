"""Where the engine reads data and writes caches, from the environment only.

The Django settings read the same variables; the engine must not import them.
"""

from __future__ import annotations

import os
from pathlib import Path

#: The repository root (the folder holding ``engine/``).
REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """``NASWEB_DATA_DIR``, else ``../shared/data`` beside the repo when present, else ``var/data``."""
    configured = os.environ.get("NASWEB_DATA_DIR")
    if configured:
        return Path(configured).expanduser().resolve()
    shared = REPO_ROOT.parent / "shared" / "data"
    if shared.is_dir():
        return shared
    return REPO_ROOT / "var" / "data"


def download_allowed() -> bool:
    """``NASWEB_DATA_DOWNLOAD`` (default on): fetch a missing dataset from its official source
    (Omniglot only; checksum-checked) instead of failing, so a fresh machine with internet works."""
    return os.environ.get("NASWEB_DATA_DOWNLOAD", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """``NASWEB_CACHE_DIR``, else ``var/cache`` in the repo (decoded datasets, LUT caches)."""
    configured = os.environ.get("NASWEB_CACHE_DIR")
    path = Path(configured).expanduser().resolve() if configured else REPO_ROOT / "var" / "cache"
    return path


def artifact_dir() -> Path:
    """``NASWEB_ARTIFACT_DIR``, else ``var/artifacts`` (checkpoints, exported models, LUTs)."""
    configured = os.environ.get("NASWEB_ARTIFACT_DIR")
    return Path(configured).expanduser().resolve() if configured else REPO_ROOT / "var" / "artifacts"
