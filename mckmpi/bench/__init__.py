"""Benchmarks, one module each with `run(out_dir, quick) -> dict` (see `mckmpi bench`).

Every figure is measured next to a baseline taken in the same run; `write_result` is the
one writer of their `bench-NAME.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def write_result(out_dir: Path, name: str, result: dict[str, Any]) -> Path:
    """Write one benchmark's numbers to OUT_DIR/bench-NAME.json (creating OUT_DIR)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench-{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
