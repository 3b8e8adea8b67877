"""Benchmarks write their figures to bench/results/<script>-<UTC time>.json, with the commit they measured."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=RESULTS.parent.parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=RESULTS.parent.parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save(script: str, args: Any, results: dict[str, Any]) -> Path:
    """Write one run's results and return the file's path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"{script}-{stamp}.json"
    record = {
        "script": script,
        "at": stamp,
        "commit": _commit(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "arguments": vars(args) if args is not None else {},
        "results": results,
    }
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"results written to {path.relative_to(RESULTS.parent.parent)}", flush=True)
    return path
