"""Test helper: an app server (uvicorn, Hypercorn, gunicorn) run as a
process of its own from the repository's root, for the examples' tests
that drive it over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    """Starts ``args`` in the repository's root; the process dies with the
    test process, even when that one is killed."""
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        args = [setpriv, "--pdeathsig", "TERM", *args]
    return subprocess.Popen(args, cwd=ROOT, env=env)


def wait_started(name: str, proc: subprocess.Popen[bytes], url: str) -> None:
    """Returns once ``url`` answers over HTTP (any status), within 30 s."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}")
        try:
            httpx.get(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not start")


def stop(proc: subprocess.Popen[bytes], limit: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``limit`` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
