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


class Hold:
    """A redis-server held by :meth:`RedisServer.hold`: stopped (SIGSTOP),
    it answers nothing, as a Redis busy with a slow command: connections
    and commands wait in the kernel's queues. It resumes at
    :meth:`release` or at the end of a ``with`` block, and at the latest
    ``at_most`` seconds after the hold began (from a daemon timer thread):
    a test that fails first, or a request that waits for Redis when it
    should not, is not stuck for good."""

    def __init__(self, proc: subprocess.Popen[bytes], at_most: float) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._released = threading.Event()
        proc.send_signal(signal.SIGSTOP)
        try:
            _wait_stopped(proc)
        except BaseException:
            self.release()
            raise
        threading.Thread(target=self._expire, args=(at_most,), daemon=True).start()

    @property
    def held(self) -> bool:
        """Whether the server is still stopped: only a release resumes it,
        so a reply that came while this was true did not come from Redis."""
        return not self._released.is_set()

    def release(self) -> None:
        """Resumes the server: runnable again once this returns (SIGCONT
        wakes a stopped process within the sender's kill()). Does nothing
        the second time, or when the server was killed or restarted."""
        with self._lock:
            if self._released.is_set():
                return
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGCONT)
            self._released.set()

    def _expire(self, at_most: float) -> None:
        if not self._released.wait(at_most):
            self.release()

    def __enter__(self) -> Hold:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _wait_stopped(proc: subprocess.Popen[bytes], limit: float = 10.0) -> None:
    """Returns once the kernel reports every thread of ``proc`` stopped
    (SIGSTOP acts when the process next runs). WNOWAIT leaves the report,
    and the exit status, to whoever waits for the process later."""
    flags = os.WSTOPPED | os.WEXITED | os.WNOWAIT | os.WNOHANG
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        info = os.waitid(os.P_PID, proc.pid, flags)
        if info is not None:
            if info.si_code != os.CLD_STOPPED:
                raise RuntimeError("redis-server exited instead of stopping")
            return
        time.sleep(0.001)
    raise RuntimeError(f"redis-server did not stop within {limit} s")


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
            if self._debug_option:  # DEBUG SLEEP, for a script of its own
                args += ["--enable-debug-command", "yes"]
            # Dies with the test process, even when that one is killed, and
            # also while held (a stopped process acts on SIGKILL alone; it
            # keeps nothing a SIGTERM would save).
            setpriv = shutil.which("setpriv")
            if setpriv is not None:
                args = [setpriv, "--pdeathsig", "KILL", *args]
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
                # Ours, not a server another test (pytest-xdist, a second
                # run) started first on the same free port while ours,
                # unable to bind, is still exiting.
                return bool(client.info("server")["process_id"] == self.proc.pid)
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
        self.proc.send_signal(signal.SIGCONT)  # a held one acts on it now
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

    def hold(self, at_most: float = 10.0) -> Hold:
        """Holds the server (see :class:`Hold`) and returns once the kernel
        reports it stopped: whatever a test sends from then on waits until
        the release, however loaded the machine. (A PING unanswered for
        some milliseconds proves nothing: a loaded machine can take longer
        than that to answer while awake.)"""
        if self.proc is None:
            raise RuntimeError("redis-server is not running")
        return Hold(self.proc, at_most)

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
