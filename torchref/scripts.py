"""The repository's scripts (entrypoints, configs, benches) imported as modules by path.

``edit/``, ``train/``, ``configs/`` and ``bench/`` are folders of scripts, not packages;
tests and benches that call their functions load them here.
"""
from __future__ import annotations

import importlib.util
import os

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def load_script(folder: str, name: str):
    """Imports ``<repo>/<folder>/<name>.py`` as a module."""
    path = os.path.join(REPO, folder, f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{folder}_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
