"""Shared pieces of the benchmark suite: figures, timing, formatting, Redis.

A *figure* is one measured quantity with one sample per repetition; it is
reported as the median with the min and max. A *ratio* is computed inside
each repetition (both sides measured back to back) and only then summarised,
so that a slow phase of a noisy machine hits both sides of it alike.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


class BrokenBenchmark(Exception):
    """A benchmark that did not measure what it claims (wrong status codes,
    a limiter that does not limit, a tool that failed). Makes the run fail,
    unlike slow timings, which never do."""


class Skip(Exception):
    """A part that cannot run here (missing tool, layer not written yet)."""


@dataclass
class Config:
    quick: bool = False
    only: list[str] = field(default_factory=list)
    # Clock of the in-process CPU-bound timings (sections core and asgi):
    # "wall" = time.perf_counter_ns; "cpu" = time.thread_time_ns, which does
    # not count the time this thread was preempted (for busy machines).
    # Anything that waits on I/O (HTTP, Redis) always uses the wall clock.
    clock: str = "wall"

    def pick(self, quick: Any, full: Any) -> Any:
        return quick if self.quick else full

    @property
    def ns(self) -> Callable[[], int]:
        return time.thread_time_ns if self.clock == "cpu" else time.perf_counter_ns


@dataclass
class Figure:
    """One quantity, one sample per repetition."""

    key: str  # stable id, e.g. "core.fixed-window.rapidlimit"
    label: str  # text for the table
    unit: str
    samples: list[float]
    better: str = "lower"  # "lower", "higher" or "" (informative)
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "label": self.label,
            "unit": self.unit,
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "samples": self.samples,
            "better": self.better,
            "note": self.note,
        }


@dataclass
class SectionResult:
    name: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # parts not measured, why
    error: str = ""  # set when the section is broken
    seconds: float = 0.0

    def add(
        self,
        key: str,
        label: str,
        unit: str,
        samples: Sequence[float],
        better: str = "lower",
        note: str = "",
    ) -> Figure:
        if not samples:
            raise BrokenBenchmark(f"{key}: no samples")
        fig = Figure(f"{self.name}.{key}", label, unit, list(samples), better, note)
        self.figures.append(fig)
        return fig

    def ratio(
        self,
        key: str,
        label: str,
        numerator: Sequence[float],
        denominator: Sequence[float],
        better: str = "",
        note: str = "",
    ) -> Figure:
        """Per-repetition ratio numerator/denominator (same run, same rep)."""
        if len(numerator) != len(denominator):
            raise BrokenBenchmark(f"{key}: ratio of unpaired samples")
        samples = [a / b for a, b in zip(numerator, denominator) if b]
        return self.add(key, label, "x", samples, better, note)

    def skip(self, what: str) -> None:
        self.skipped.append(what)
        print(f"  SKIPPED {what}", flush=True)

    def log(self, text: str) -> None:
        self.notes.append(text)
        print(f"  {text}", flush=True)

    def get(self, key: str) -> Figure | None:
        for fig in self.figures:
            if fig.key == f"{self.name}.{key}":
                return fig
        return None

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "figures": [f.as_json() for f in self.figures],
            "notes": self.notes,
            "skipped": self.skipped,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def interleaved(
    variants: dict[str, Callable[[], float]], reps: int
) -> dict[str, list[float]]:
    """Runs every variant once per repetition, rotating the order each time,
    and returns the samples per variant (index i = repetition i)."""
    names = list(variants)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(reps):
        shift = rep % len(names) if names else 0
        order = names[shift:] + names[:shift]
        for name in order:
            samples[name].append(variants[name]())
    return samples


def fmt_number(value: float) -> str:
    mag = abs(value)
    if mag == 0:
        return "0"
    if mag >= 1e7:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:,.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1.1:
        return f"{value:.2f}"
    # Ratios just above 1 keep the third decimal that those just below it
    # have: the instruction ratios differ in it (1.006 against 1.010).
    return f"{value:.3f}"


def fmt_figure(fig: Figure) -> str:
    if len(fig.samples) == 1:
        spread = "(1 run)"
    else:
        spread = f"({fmt_number(fig.min)} – {fmt_number(fig.max)})"
    return f"{fmt_number(fig.median):>10} {fig.unit:<9} {spread}"


def nonneg(values: Sequence[float]) -> list[float]:
    return [max(0.0, v) for v in values]


# --------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokenBenchmark(f"process exited with {proc.returncode}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.5),
        ):
            return
        time.sleep(0.05)
    raise BrokenBenchmark(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def pinned(cmd: list[str], cpu: int | None) -> list[str]:
    """Prefixes ``taskset -c CPU`` when pinning is possible."""
    if cpu is None or shutil.which("taskset") is None or cpu_count() < 2:
        return cmd
    return ["taskset", "-c", str(cpu), *cmd]


def proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (which may hold
    spaces and parentheses): [0] the state, [11] and [12] utime and stime."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def terminate(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# "totals:" is the sum over the run; "summary:" can be 0 when the
# instrumentation starts late, so it is only the fallback.
_CG_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)
_CG_SUMMARY = re.compile(r"^summary:\s+(\d+)", re.M)


def callgrind_total(out: Path, subject: str) -> int:
    """The instructions the callgrind dump ``out`` counts."""
    text = out.read_text()
    m = _CG_TOTALS.search(text) or _CG_SUMMARY.search(text)
    if not m:
        raise BrokenBenchmark(f"callgrind {subject}: no totals in {out}")
    return int(m.group(1))


RAPID_REDIS_OPTIONS = "timeout=5&connect_timeout=5"

# The floor of any script call: a script that returns at once (sections 4
# and 6).
NOP_SCRIPT = "return 0"


class RedisServer:
    """A throwaway redis-server on 127.0.0.1, no persistence."""

    def __init__(
        self,
        cpu: int | None = None,
        wrapper: Sequence[str] = (),
        exe: str | None = None,
        wait: float = 10,
    ) -> None:
        """``wrapper``: a command the server runs under (valgrind), in the
        same process; ``exe``: another redis-server than PATH's; ``wait``:
        seconds it may take to listen."""
        self.cpu = cpu
        self.wrapper = list(wrapper)
        self.exe = exe
        self.wait = wait
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    @property
    def rapid_uri(self) -> str:
        """The URI for rapidlimit: its Redis timeout (0.2 s by default, after
        which the fail-closed policy rejects) raised to 5 s, as redis-py,
        under slowapi, has no timeout at all; on a loaded machine a reply
        can take longer than 0.2 s."""
        return f"{self.uri}?{RAPID_REDIS_OPTIONS}"

    def uri_for(self, package: str) -> str:
        return self.rapid_uri if package == "rapidlimit" else self.uri

    def __enter__(self) -> RedisServer:
        exe = self.exe or shutil.which("redis-server")
        if exe is None:
            raise Skip(
                "redis-server not installed (scripts/install-deps.sh, "
                "or: apt-get install redis-server)"
            )
        self.port = free_port()
        cmd = [
            *self.wrapper,
            exe,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ]
        # Its warnings go nowhere: a pipe nobody reads would stall it once full.
        self.proc = subprocess.Popen(
            pinned(cmd, self.cpu), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_port(self.port, self.wait, self.proc)
        except BaseException:  # __exit__ is not called when __enter__ fails
            terminate(self.proc)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            terminate(self.proc)

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port)


@contextlib.contextmanager
def timer() -> Iterator[list[float]]:
    """``with timer() as t: ...`` then ``t[0]`` is the elapsed seconds."""
    out: list[float] = []
    start = time.perf_counter()
    try:
        yield out
    finally:
        out.append(time.perf_counter() - start)


def python() -> str:
    return sys.executable


def rss_bytes() -> int:
    """Resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def rapidlimit_web_available() -> str:
    """'' if rapidlimit's slowapi-compatible layer imports, else why not."""
    try:
        from rapidlimit import Limiter, _rate_limit_exceeded_handler  # noqa: F401
        from rapidlimit.middleware import (  # noqa: F401
            SlowAPIASGIMiddleware,
            SlowAPIMiddleware,
        )
        from rapidlimit.util import get_remote_address  # noqa: F401
    except Exception as exc:  # the package under test is broken, not absent
        raise BrokenBenchmark(f"rapidlimit's slowapi layer: {exc!r}") from exc
    return ""


def rapidlimit_redis_available(uri: str) -> str:
    """'' if ``storage_from_string(uri)`` works for a redis:// uri."""
    try:
        from rapidlimit.storage import storage_from_string

        storage = storage_from_string(uri)
        try:
            check = getattr(storage, "check", None)
            if check is not None and not check():
                raise BrokenBenchmark(
                    f"rapidlimit Redis storage check() failed for {uri}"
                )
        finally:
            # Left open, its I/O thread would log "cannot reach redis" once
            # the section stops this redis-server.
            close = getattr(storage, "close", None)
            if close is not None:
                close()
    except BrokenBenchmark:
        raise
    except Exception as exc:  # the package under test is broken, not absent
        raise BrokenBenchmark(f"rapidlimit Redis backend: {exc!r}") from exc
    return ""
