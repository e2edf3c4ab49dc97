"""Runs inside the application image (read-only root filesystem): is any bytecode missing?

Prints one JSON object: the modules a worker start imports that Python had to compile from source
(it cannot write bytecode there, so it would compile them again at every start), the ``.py`` files
of the venv and the standard library without a cached ``.pyc``, and the venv's bytecode that is
not hash-based and unchecked (timestamp bytecode goes stale when file times change). Standard
library only, so it runs with the image's interpreter; tests/e2e/test_stack_image.py asserts on it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import sysconfig
from importlib import _bootstrap_external  # type: ignore[attr-defined]
from pathlib import Path
from typing import Any

compiled: list[str] = []
_source_to_code = _bootstrap_external.SourceLoader.source_to_code


def _spy(self: Any, data: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
    """Called only when no valid cached bytecode exists for ``path``."""
    compiled.append(str(path))
    return _source_to_code(self, data, path, *args, **kwargs)


_bootstrap_external.SourceLoader.source_to_code = _spy

# What a worker imports to start: the entry point, Celery's worker command, the app and its task
# modules, the pools and the consumer; and the scaler's entry point (same image, same rule).
STARTUP_MODULES = (
    "services.worker",
    "celery.bin.worker",
    "celery.apps.worker",
    "celery.worker.components",
    "celery.worker.consumer",
    "celery.concurrency.prefork",
    "celery.concurrency.thread",
    "celery.concurrency.solo",
    "kombu.transport.redis",
    "services.celery_app",
    "scaler.cli",
)
for _name in STARTUP_MODULES:
    importlib.import_module(_name)
sys.modules["services.celery_app"].app.loader.import_default_modules()

# Test suites and other installations' packages (the system's site-/dist-packages, which the venv
# does not see) are not imported by anything here.
SKIP_PARTS = {"tests", "test", "idle_test", "site-packages", "dist-packages"}


def missing_under(root: Path) -> list[str]:
    """Every .py below ``root`` whose cached .pyc does not exist (skipped directories aside)."""
    return [
        str(path)
        for path in root.rglob("*.py")
        if not SKIP_PARTS.intersection(path.relative_to(root).parts[:-1])
        and not os.path.exists(importlib.util.cache_from_source(str(path)))
    ]


def timestamp_based(root: Path) -> list[str]:
    """The .pyc files below ``root`` that are not unchecked hash-based (PEP 552 flags == 1)."""
    found = []
    for pyc in root.rglob("*.pyc"):
        with pyc.open("rb") as f:
            flags = int.from_bytes(f.read(8)[4:8], "little")
        if flags != 1:
            found.append(str(pyc))
    return found


site_packages = Path(sysconfig.get_path("purelib"))
stdlib = Path(sysconfig.get_path("stdlib"))
print(
    json.dumps(
        {
            "dont_write_bytecode": sys.flags.dont_write_bytecode,
            "compiled_at_import": compiled,
            "missing_in_venv": missing_under(site_packages),
            "missing_in_stdlib": missing_under(stdlib),
            "not_unchecked_hash_in_venv": timestamp_based(site_packages),
            "modules_imported": len(sys.modules),
        }
    )
)
