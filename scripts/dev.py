#!/usr/bin/env python3
"""Developer entry point needing only Python 3.11+: `python3 scripts/dev.py demo | test | check`.

Each command first makes `.venv` and installs SmartMail with its test extras into it (once), then
runs the demo, the test suite, or the guards CI runs (ruff, ruff format, mypy, import rules).
Extra arguments go to `smartmail demo` or pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - run by whatever python3 the machine has
        sys.exit(f"SmartMail needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    # Reinstall only when pyproject.toml changed since the last install.
    stamp = VENV / ".smartmail-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("installing SmartMail and its test dependencies into .venv", flush=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], check=True)
    subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(digest)


def check() -> int:
    """The guards, each run even when one before it failed; non-zero if any failed."""
    bin_ = VENV / "bin"
    guards = [
        [str(bin_ / "ruff"), "check", "."],
        [str(bin_ / "ruff"), "format", "--check", "."],
        [str(bin_ / "mypy")],
        [str(bin_ / "lint-imports")],
    ]
    failed = [g for g in guards if subprocess.run(g, cwd=ROOT).returncode != 0]
    for guard in failed:
        print(f"failed: {Path(guard[0]).name} {' '.join(guard[1:])}", file=sys.stderr)
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("demo", "test", "check"):
        print(__doc__)
        return 2
    ensure_venv()
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "check":
        return check()
    if command == "demo":
        argv = [str(VENV / "bin" / "smartmail"), "demo", *rest]
    else:
        argv = [str(PYTHON), "-m", "pytest", *rest]
    return subprocess.run(argv, cwd=ROOT, env=os.environ).returncode


if __name__ == "__main__":
    sys.exit(main())
