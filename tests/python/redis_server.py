"""Test helper: a throwaway ``redis-server`` from PATH on 127.0.0.1 at a free
port, without persistence, stopped afterwards.

The ``server`` and ``own_server`` fixtures (tests/python/conftest.py) wrap
:class:`RedisServer`; a test skips only when ``redis-server`` cannot be
found.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any

import pytest


def find_redis_server() -> str | None:
    return shutil.which("redis-server")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _version(binary: str) -> int:
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False, timeout=30
    ).stdout
    at = out.find("v=")
    try:
        return int(out[at + 2 :].split(".")[0]) if at >= 0 else 0
    except ValueError:
        return 0


class RedisServer:
    """One redis-server process; ``restart()`` reuses the port."""

    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            pytest.skip("redis-server not found in PATH")
        self.binary: str = binary
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = tempfile.mkdtemp(prefix="rapidlimit-redis-")
        self.unix_path = os.path.join(self._dir, "redis.sock")
        self._debug_option = _version(binary) >= 7

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int = 0) -> None:
        for _ in range(5):
            self.port = port or free_port()
            args = [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--unixsocket",
                self.unix_path,
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
                "--dir",
                self._dir,
            ]
            if self._debug_option:
                args += ["--enable-debug-command", "yes"]
            # Dies with the test process, even when that one is killed.
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                args = [setpriv, "--pdeathsig", "TERM", *args]
            self.proc = subprocess.Popen(
                args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                ready = self._wait_ready(10.0)
            except BaseException:  # a test timeout, Ctrl-C: no server left
                self.stop()
                raise
            if ready:
                return
            self.stop()
            time.sleep(0.2)
        raise RuntimeError("redis-server did not start")

    def _wait_ready(self, limit: float) -> bool:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            client = self.client()
            try:
                if client.ping():
                    return True
            except Exception:
                pass
            finally:
                client.close()
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Abrupt death, as in a crash."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.start(self.port)

    def sleep_in_background(self, seconds: float) -> threading.Thread:
        """Holds the server for ``seconds`` (DEBUG SLEEP, sent from a new
        thread on a connection of its own) and returns once it no longer
        answers (a fixed pause is at times too short on a loaded machine);
        the caller joins the thread. A daemon, whose reply may take
        ``seconds``: a test that fails before its join never holds the
        interpreter's exit."""
        thread = threading.Thread(
            target=self.client(seconds + 5).execute_command,
            args=("DEBUG", "SLEEP", str(seconds)),
            daemon=True,
        )
        thread.start()
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and self._answers():
            time.sleep(0.002)
        return thread

    def hold(self, seconds: float) -> threading.Thread:
        """:meth:`sleep_in_background`, failing unless the server then
        sleeps: what a test sends next is sure to wait for the sleep."""
        sleeper = self.sleep_in_background(seconds)
        if self._answers():
            raise RuntimeError("DEBUG SLEEP did not hold the server")
        return sleeper

    def _answers(self) -> bool:
        """Whether a PING on a new connection is answered within 50 ms (a
        plain socket: redis-py retries a command that timed out)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.05) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def client(self, timeout: float = 5) -> Any:
        import redis

        return redis.Redis(
            host="127.0.0.1",
            port=self.port,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
        )

    def command_calls(self) -> dict[str, int]:
        """calls per command from INFO commandstats ({"evalsha": 12})."""
        stats = self.client().info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
        }

    def reset_stats(self) -> None:
        self.client().config_resetstat()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)
