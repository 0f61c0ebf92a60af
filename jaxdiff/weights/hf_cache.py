"""Models already in the local Hugging Face hub cache, found by ``org/name``; never downloads.

The cache layout is huggingface_hub's: ``<cache>/models--<org>--<name>/refs/<revision>``
holds a commit hash and ``snapshots/<hash>/`` the files. ``<cache>`` is ``$HF_HUB_CACHE``,
else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
``~/.cache/huggingface/hub``.
"""
from __future__ import annotations

import os
import re
from typing import Optional

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> str:
    """The hub cache folder huggingface_hub would use with the current environment."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
        "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def is_repo_id(name: str) -> bool:
    """``org/name`` that is not an existing local path."""
    return bool(name) and bool(_REPO_ID.match(name)) and not os.path.exists(name)


def repo_folder(repo_id: str) -> str:
    return os.path.join(hub_cache_dir(), "models--" + repo_id.replace("/", "--"))


def find_snapshot(repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    """The snapshot folder of ``repo_id`` at ``revision`` (default ``main``), or None."""
    folder = repo_folder(repo_id)
    revision = revision or "main"
    commit = revision if _COMMIT.match(revision) else None
    ref = os.path.join(folder, "refs", revision)
    if commit is None and os.path.isfile(ref):
        with open(ref, encoding="utf-8") as f:
            commit = f.read().strip()
    snap = os.path.join(folder, "snapshots", commit) if commit else None
    return snap if snap and os.path.isdir(snap) else None


def resolve(repo_id: str, revision: Optional[str] = None) -> str:
    """Like ``find_snapshot`` but a missing model is a one-line FileNotFoundError saying
    where it looked and how to get the model."""
    snap = find_snapshot(repo_id, revision)
    if snap is None:
        raise FileNotFoundError(
            f"{repo_id}: not in the local Hugging Face cache (looked for revision "
            f"'{revision or 'main'}' in {repo_folder(repo_id)}; set HF_HOME / HF_HUB_CACHE if "
            f"your cache is elsewhere); jaxdiff never downloads - fetch it first with "
            f"`hf download {repo_id}`, or pass a local folder or file.")
    return snap
