"""Integration tests across containers: docker-compose.yml's three sites.

The compose driver and the demo scenario live in ``scripts/compose_demo.py``
(``make compose-demo`` runs the same scenario); this package loads it as
:data:`compose_demo`.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def _load() -> ModuleType:
    name = "splitmirror_compose_demo"
    if name in sys.modules:
        return sys.modules[name]
    path = Path(__file__).resolve().parents[2] / "scripts" / "compose_demo.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


compose_demo = _load()
