"""rapidlimit benchmark suite: rapidlimit against slowapi + limits and against
no limiter, in the same run.

    benchmarks/run.sh [--quick] [--only SECTION ...] [--json PATH] [--markdown PATH]

Sections: core, asgi, http, redis, memory, callgrind. Prints, per section, the
median of several repetitions with min and max, ratios taken inside each
repetition, then the targets as MET / NOT MET, and writes everything as JSON
(default benchmarks/results/<timestamp>.json, and results/latest.json).

Exit status: 1 if a benchmark is broken (an exception, an app answering with
the wrong status codes, a tool failing), 2 on bad arguments; never because
something is slow. A section whose tools or layers are missing is skipped
with the reason.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_asgi  # noqa: E402
import bench_callgrind  # noqa: E402
import bench_core  # noqa: E402
import bench_http  # noqa: E402
import bench_memory  # noqa: E402
import bench_redis  # noqa: E402
from common import (  # noqa: E402
    HERE,
    ROOT,
    BrokenBenchmark,
    Config,
    Figure,
    SectionResult,
    Skip,
    fmt_figure,
    fmt_number,
)

SECTIONS: dict[str, ModuleType] = {
    "core": bench_core,
    "asgi": bench_asgi,
    "http": bench_http,
    "redis": bench_redis,
    "memory": bench_memory,
    "callgrind": bench_callgrind,
}


# ----------------------------------------------------------------- targets


def _stated(f: Figure) -> str:
    """A figure as a target's detail names it: label, median, unit."""
    return f"{f.label.strip()}: {fmt_number(f.median)} {f.unit}".replace("  ", " ")


@dataclass
class Target:
    text: str
    keys: list[str]  # figures checked (all must pass); first found is shown
    op: str  # "<=" or ">="
    threshold: float
    unit: str = ""
    fallback: list[str] | None = None  # used when keys were not measured
    fallback_note: str = ""
    # Figures shown after the checked ones, never checked: the floors and
    # the instruction counts that say why a target on a noisy figure is
    # met or missed, so that every run's report carries them.
    context: list[str] | None = None

    def evaluate(self, figs: dict[str, Figure]) -> dict[str, Any]:
        keys, note = self.keys, ""
        if not any(k in figs for k in keys) and self.fallback:
            keys, note = self.fallback, self.fallback_note
        found = [figs[k] for k in keys if k in figs]
        if not found:
            return {
                "target": self.text,
                "status": "NOT MEASURED",
                "detail": "not measured in this run",
            }
        ok = [
            f.median <= self.threshold
            if self.op == "<="
            else f.median >= self.threshold
            for f in found
        ]
        shown = ", ".join(_stated(f) for f in found)
        missing = [k for k in keys if k not in figs]
        if missing:
            note = (
                note + "; " if note else ""
            ) + f"{len(missing)} figure(s) not measured"
        about = "; ".join(_stated(figs[k]) for k in self.context or () if k in figs)
        return {
            "target": self.text,
            "status": "MET" if all(ok) else "NOT MET",
            "detail": shown
            + (f" ({note})" if note else "")
            + (f" [context: {about}]" if about else ""),
            "figures": [f.key for f in found],
        }


# What the method reads for two identical servers: beside every end-to-end
# target.
_CONTROL = "http.async.none.control.vs_none"

# What each end-to-end target's figure stands on: the control, the floor
# any limiter in that place pays and rapidlimit's instructions against it.
_E2E_CONTEXT: dict[tuple[str, str], list[str]] = {
    ("memory", "noheaders"): [
        _CONTROL,
        "callgrind.http.rapidlimit.vs_none",
    ],
    ("memory", "headers"): [
        _CONTROL,
        "http.async.none.headers.vs_none",
        "callgrind.http.none.headers.vs_none",
        "callgrind.http.rapidlimit.headers.vs_none_headers",
    ],
    ("Redis", "noheaders"): [
        _CONTROL,
        "http.async.none.await.vs_none",
        "http.async.none.await.redis.vs_none",
        "callgrind.http.rapidlimit.redis.vs_none_await",
        "http.async.rapidlimit.redis.asgi-middleware.noheaders.allowed.vs_none",
    ],
    ("Redis", "headers"): [
        _CONTROL,
        "http.async.none.await.headers.vs_none",
        "http.async.none.await.redis.headers.vs_none",
        "callgrind.http.rapidlimit.redis.headers.vs_none_await_headers",
        "http.async.rapidlimit.redis.asgi-middleware.headers.allowed.vs_none",
    ],
}


def _paths(fmt: str) -> list[str]:
    return [fmt.format(p) for p in ("decorator", "middleware", "asgi-middleware")]


TARGETS = [
    Target(
        "memory fixed-window hit from Python <= 150 ns",
        ["core.fixed-window.rapidlimit"],
        "<=",
        150,
    ),
    Target(
        "memory fixed-window hit >= 25x faster than limits",
        ["core.fixed-window.speedup"],
        ">=",
        25,
    ),
    Target(
        "<= 64 bytes per fixed-window key at 1,000,000 keys (memory_bytes)",
        ["memory.rapidlimit.1000000.memory_bytes_per_key"],
        "<=",
        64,
        fallback=["memory.rapidlimit.100000.memory_bytes_per_key"],
        fallback_note="100,000 keys; 1,000,000 in the full run",
    ),
    Target(
        "<= 64 bytes per fixed-window key at 1,000,000 keys (RSS growth)",
        ["memory.rapidlimit.1000000.rss_per_key"],
        "<=",
        64,
        fallback=["memory.rapidlimit.100000.rss_per_key"],
        fallback_note="100,000 keys; 1,000,000 in the full run",
    ),
    Target(
        "<= 5 µs added per request in process, headers on (each path)",
        _paths("asgi.rapidlimit.{}.headers.allowed.added"),
        "<=",
        5,
    ),
    *[
        Target(
            f"end to end, {storage}: >= {pct} % of the no-limiter throughput, "
            + ("headers on" if hdr == "headers" else "headers off (the default)"),
            [
                f"http.{ep}.rapidlimit.{storage.lower()}.decorator.{hdr}.allowed.vs_none"
                for ep in ("async", "sync")
            ],
            ">=",
            pct / 100,
            context=_E2E_CONTEXT[(storage, hdr)],
        )
        for storage, pct in (("memory", 97), ("Redis", 90))
        for hdr in ("noheaders", "headers")
    ],
    Target(
        "reject path at least as fast as allowed path (in process: time ratio)",
        _paths("asgi.reject_over_allowed.rapidlimit.{}.headers"),
        "<=",
        1.0,
    ),
    Target(
        "reject path at least as fast as allowed path (end to end: req/s ratio)",
        [
            "http.async.rapidlimit.memory.decorator.headers.rejected_over_allowed",
            "http.async.rapidlimit.redis.decorator.headers.rejected_over_allowed",
            "http.sync.rapidlimit.memory.decorator.headers.rejected_over_allowed",
            "http.sync.rapidlimit.redis.decorator.headers.rejected_over_allowed",
        ],
        ">=",
        1.0,
        context=[
            _CONTROL,
            "callgrind.http.rapidlimit.headers.rejected.vs_allowed",
        ],
    ),
    Target(
        "Redis: one round trip per request",
        [
            f"redis.round_trips.rapidlimit.{h}.{t}"
            for h in ("noheaders", "headers")
            for t in ("allowed", "rejected")
        ],
        "<=",
        1.0,
    ),
    Target(
        "Redis: >= 10x slowapi's decisions/s at 64 concurrent requests (limiter)",
        ["redis.decisions.speedup.c64"],
        ">=",
        10,
    ),
    Target(
        "Redis: hit latency <= 1.2x a bare PING (raw socket)",
        ["redis.latency.rapidlimit_over_ping"],
        "<=",
        1.2,
        context=["redis.latency.nop_over_ping", "redis.latency.get_set_over_ping"],
    ),
    Target(
        "Redis: <= 5 µs Redis time per decision, one at a time (commandstats)",
        [
            "redis.script_usec.rapidlimit.fixed-window.c1",
            "redis.script_usec.rapidlimit.token-bucket.c1",
        ],
        "<=",
        5,
        context=[
            "redis.script_usec.floor.nop.c1",
            "redis.script_usec.floor.get_set.c1",
            "redis.script_usec.floor.min_fixed_window.c1",
            "redis.script_usec.rapidlimit.fixed-window.c1sync",
            "redis.script_usec.rapidlimit.token-bucket.c1sync",
            # The same work in instructions, which the VM's noise leaves alone.
            "callgrind.redis.empty-script",
            "callgrind.redis.rapidlimit.fixed-window.lone",
            "callgrind.redis.rapidlimit.token-bucket.lone",
        ],
    ),
    Target(
        "Redis: <= 5 µs Redis time per decision, 64 in flight (commandstats)",
        [
            "redis.script_usec.rapidlimit.fixed-window.c64",
            "redis.script_usec.rapidlimit.token-bucket.c64",
        ],
        "<=",
        5,
    ),
]


# ---------------------------------------------------------------- summary

# (measure, rapidlimit figure, slowapi/limits figure, ratio figure): the
# compact table for the README; any figure may be missing from a run.
_ASGI = "asgi.{}.{}.headers.{}.added"
_HTTP = "http.async.{}.{}.decorator.headers.{}.vs_none"
_HTTP0 = "http.async.{}.{}.decorator.noheaders.{}.vs_none"
HEADLINE: list[tuple[str, str, str, str]] = [
    (
        "fixed-window hit from Python, memory (ns)",
        "core.fixed-window.rapidlimit",
        "core.fixed-window.limits",
        "core.fixed-window.speedup",
    ),
    (
        "moving-window hit from Python, memory (ns)",
        "core.moving-window.rapidlimit",
        "core.moving-window.limits",
        "core.moving-window.speedup",
    ),
    (
        "sliding-window-counter hit, memory (ns)",
        "core.sliding-window-counter.rapidlimit",
        "core.sliding-window-counter.limits",
        "core.sliding-window-counter.speedup",
    ),
    (
        "instructions per fixed-window hit (callgrind)",
        "callgrind.rapidlimit.fixed-window",
        "callgrind.limits.fixed-window",
        "callgrind.fixed-window.ratio",
    ),
    (
        "Redis server instructions per fixed-window request, headers' values "
        "included (callgrind)",
        "callgrind.redis.rapidlimit.fixed-window.lone",
        "callgrind.redis.limits.fixed-window.hit_stats",
        "",
    ),
    (
        "instructions added per request, decorator, headers on (callgrind)",
        "callgrind.asgi.rapidlimit.added",
        "callgrind.asgi.slowapi.added",
        "",
    ),
    (
        "instructions added per request, SlowAPIASGIMiddleware, headers on (callgrind)",
        "callgrind.asgi.rapidlimit.asgi-middleware.added",
        "callgrind.asgi.slowapi.asgi-middleware.added",
        "",
    ),
    (
        "added per request in process, decorator, headers on (µs)",
        _ASGI.format("rapidlimit", "decorator", "allowed"),
        _ASGI.format("slowapi", "decorator", "allowed"),
        "asgi.speedup.decorator.headers.allowed",
    ),
    (
        "added per request in process, SlowAPIMiddleware, headers on (µs)",
        _ASGI.format("rapidlimit", "middleware", "allowed"),
        _ASGI.format("slowapi", "middleware", "allowed"),
        "asgi.speedup.middleware.headers.allowed",
    ),
    (
        "added per request in process, SlowAPIASGIMiddleware, headers on (µs)",
        _ASGI.format("rapidlimit", "asgi-middleware", "allowed"),
        _ASGI.format("slowapi", "asgi-middleware", "allowed"),
        "asgi.speedup.asgi-middleware.headers.allowed",
    ),
    (
        "added per rejected request in process, decorator, headers on (µs)",
        _ASGI.format("rapidlimit", "decorator", "rejected"),
        _ASGI.format("slowapi", "decorator", "rejected"),
        "asgi.speedup.decorator.headers.rejected",
    ),
    (
        "HTTP req/s, a fresh no-limiter server vs no limiter (control)",
        _CONTROL,
        "",
        "",
    ),
    (
        "HTTP req/s vs no limiter, memory, allowed, headers off (default)",
        _HTTP0.format("rapidlimit", "memory", "allowed"),
        _HTTP0.format("slowapi", "memory", "allowed"),
        "",
    ),
    (
        "HTTP req/s vs no limiter, memory, allowed, headers on",
        _HTTP.format("rapidlimit", "memory", "allowed"),
        _HTTP.format("slowapi", "memory", "allowed"),
        "",
    ),
    (
        "  floor: a no-limiter endpoint setting the same four headers itself, "
        "vs no limiter",
        "http.async.none.headers.vs_none",
        "",
        "",
    ),
    (
        "HTTP server CPU per request vs no limiter, memory, allowed, headers on",
        _HTTP.format("rapidlimit", "memory", "allowed").replace(
            "vs_none", "cpu_vs_none"
        ),
        _HTTP.format("slowapi", "memory", "allowed").replace("vs_none", "cpu_vs_none"),
        "",
    ),
    (
        "HTTP req/s vs no limiter, memory, all rejected, headers on",
        _HTTP.format("rapidlimit", "memory", "rejected"),
        _HTTP.format("slowapi", "memory", "rejected"),
        "",
    ),
    (
        "HTTP req/s vs no limiter, Redis, allowed, headers off (default)",
        _HTTP0.format("rapidlimit", "redis", "allowed"),
        _HTTP0.format("slowapi", "redis", "allowed"),
        "",
    ),
    (
        "HTTP req/s vs no limiter, Redis, allowed, headers on",
        _HTTP.format("rapidlimit", "redis", "allowed"),
        _HTTP.format("slowapi", "redis", "allowed"),
        "",
    ),
    (
        "  Redis, allowed, headers off, checked by SlowAPIASGIMiddleware",
        "http.async.rapidlimit.redis.asgi-middleware.noheaders.allowed.vs_none",
        "",
        "",
    ),
    (
        "  Redis, allowed, headers on, checked by SlowAPIASGIMiddleware",
        "http.async.rapidlimit.redis.asgi-middleware.headers.allowed.vs_none",
        "",
        "",
    ),
    (
        "HTTP server CPU per request vs no limiter, Redis, allowed, headers on",
        _HTTP.format("rapidlimit", "redis", "allowed").replace(
            "vs_none", "cpu_vs_none"
        ),
        _HTTP.format("slowapi", "redis", "allowed").replace("vs_none", "cpu_vs_none"),
        "",
    ),
    (
        "  floor: a no-limiter endpoint awaiting asyncio.sleep(0) once, vs no limiter",
        "http.async.none.await.vs_none",
        "",
        "",
    ),
    (
        "  floor: the same endpoint also setting the four headers, vs no limiter",
        "http.async.none.await.headers.vs_none",
        "",
        "",
    ),
    (
        "  floor: a no-limiter endpoint awaiting one Redis PING (a minimal "
        "pipelined client), vs no limiter",
        "http.async.none.await.redis.vs_none",
        "",
        "",
    ),
    (
        "  floor: the same endpoint also setting the four headers, vs no limiter",
        "http.async.none.await.redis.headers.vs_none",
        "",
        "",
    ),
    (
        "HTTP server time in garbage collection per request, Redis, allowed, "
        "headers on (µs)",
        _HTTP.format("rapidlimit", "redis", "allowed").replace("vs_none", "gc"),
        _HTTP.format("slowapi", "redis", "allowed").replace("vs_none", "gc"),
        "",
    ),
    (
        "  the same, checked by SlowAPIASGIMiddleware (µs)",
        "http.async.rapidlimit.redis.asgi-middleware.headers.allowed.gc",
        "",
        "",
    ),
    (
        "  the same, no limiter (µs)",
        "http.async.none.gc",
        "",
        "",
    ),
    (
        "  the same, the no-limiter endpoint awaiting once (µs)",
        "http.async.none.await.gc",
        "",
        "",
    ),
    (
        "HTTP server instructions per request vs no limiter, memory, headers off "
        "(callgrind)",
        "callgrind.http.rapidlimit.vs_none",
        "callgrind.http.slowapi.vs_none",
        "",
    ),
    (
        "HTTP server instructions per request vs no limiter, memory, headers on "
        "(callgrind)",
        "callgrind.http.rapidlimit.headers.vs_none",
        "",
        "",
    ),
    (
        "  floor: a no-limiter endpoint setting the same four headers itself, "
        "vs no limiter (callgrind)",
        "callgrind.http.none.headers.vs_none",
        "",
        "",
    ),
    (
        "  memory, headers on, vs that endpoint (callgrind)",
        "callgrind.http.rapidlimit.headers.vs_none_headers",
        "",
        "",
    ),
    (
        "HTTP server instructions per request vs no limiter, Redis, headers off "
        "(callgrind)",
        "callgrind.http.rapidlimit.redis.vs_none",
        "",
        "",
    ),
    (
        "  floor: a no-limiter endpoint awaiting asyncio.sleep(0) once, vs no "
        "limiter (callgrind)",
        "callgrind.http.none.await.vs_none",
        "",
        "",
    ),
    (
        "  Redis, headers off, vs that endpoint (callgrind)",
        "callgrind.http.rapidlimit.redis.vs_none_await",
        "",
        "",
    ),
    (
        "HTTP server instructions per request vs no limiter, Redis, headers on "
        "(callgrind)",
        "callgrind.http.rapidlimit.redis.headers.vs_none",
        "",
        "",
    ),
    (
        "  floor: a no-limiter endpoint awaiting once and setting the four "
        "headers, vs no limiter (callgrind)",
        "callgrind.http.none.await.headers.vs_none",
        "",
        "",
    ),
    (
        "  Redis, headers on, vs that endpoint (callgrind)",
        "callgrind.http.rapidlimit.redis.headers.vs_none_await_headers",
        "",
        "",
    ),
    (
        "  Redis, headers off, checked by SlowAPIASGIMiddleware, vs no limiter "
        "(callgrind)",
        "callgrind.http.rapidlimit.redis.asgi.vs_none",
        "",
        "",
    ),
    (
        "  the same, vs the endpoint awaiting once (callgrind)",
        "callgrind.http.rapidlimit.redis.asgi.vs_none_await",
        "",
        "",
    ),
    (
        "HTTP server instructions per rejected / allowed request, memory, "
        "headers on (callgrind)",
        "callgrind.http.rapidlimit.headers.rejected.vs_allowed",
        "",
        "",
    ),
    (
        "HTTP p99 latency, memory, allowed (ms)",
        "http.async.rapidlimit.memory.decorator.headers.allowed.p99",
        "http.async.slowapi.memory.decorator.headers.allowed.p99",
        "",
    ),
    (
        "Redis round trips per request, headers on",
        "redis.round_trips.rapidlimit.headers.allowed",
        "redis.round_trips.slowapi.headers.allowed",
        "",
    ),
    (
        "Redis CPU per request, headers on (µs)",
        "redis.redis_cpu.rapidlimit.headers.allowed",
        "redis.redis_cpu.slowapi.headers.allowed",
        "",
    ),
    (
        "Redis decisions/s, 64 concurrent",
        "redis.decisions.rapidlimit.c64",
        "redis.decisions.slowapi.c64",
        "redis.decisions.speedup.c64",
    ),
    (
        "Redis hit latency / bare PING",
        "redis.latency.rapidlimit_over_ping",
        "redis.latency.limits_over_ping",
        "",
    ),
    (
        "Redis: an empty script's EVALSHA / bare PING (floor of any script)",
        "redis.latency.nop_over_ping",
        "",
        "",
    ),
    (
        "bytes per key, 1,000,000 keys (RSS)",
        "memory.rapidlimit.1000000.rss_per_key",
        "memory.limits.1000000.rss_per_key",
        "",
    ),
]


def _cell(figs: dict[str, Figure], key: str) -> str:
    f = figs.get(key) if key else None
    if f is None:
        return "–"
    if len(f.samples) == 1:
        return fmt_number(f.median)
    return f"{fmt_number(f.median)} ({fmt_number(f.min)}–{fmt_number(f.max)})"


def headline(figs: dict[str, Figure]) -> list[tuple[str, str, str, str]]:
    rows = []
    for label, rkey, skey, ratio in HEADLINE:
        if rkey in figs or skey in figs:
            rows.append(
                (label, _cell(figs, rkey), _cell(figs, skey), _cell(figs, ratio))
            )
    return rows


# ------------------------------------------------------------------- meta


def _cmd_version(cmd: list[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    text = (p.stdout or p.stderr).strip().splitlines()
    return text[0] if text else "?"


def _pkg_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# The CPU features glibc picks its string and memory routines by (and so
# what callgrind counts in them): instruction counts compare only between
# hosts that agree on these.
_DISPATCH_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "bmi2",
    "erms",
    "fsrm",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "evex",
)


def _cpu_features() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in _DISPATCH_FLAGS if f in flags]
    except OSError:
        pass
    return []


def _git() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return sha + ("+dirty" if dirty else "") if sha else "?"


def meta(cfg: Config) -> dict[str, Any]:
    import rapidlimit

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "mode": "quick" if cfg.quick else "full",
        "clock": cfg.clock,
        "git": _git(),
        "machine": {
            "cpu": _cpu_model(),
            "cpu_features": _cpu_features(),
            "libc": " ".join(platform.libc_ver()),
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "kernel": platform.release(),
            "loadavg_start": os.getloadavg(),
        },
        "python": sys.version.split()[0],
        "packages": {
            n: _pkg_version(n)
            for n in (
                "rapidlimit",
                "slowapi",
                "limits",
                "fastapi",
                "starlette",
                "uvicorn",
                "redis",
                "hiredis",
                "uvloop",
                "httptools",
            )
        },
        "rapidlimit_core": getattr(rapidlimit, "__version__", "?"),
        "tools": {
            "wrk": _cmd_version(["wrk", "-v"]),
            "redis-server": _cmd_version(["redis-server", "--version"]),
            "valgrind": _cmd_version(["valgrind", "--version"]),
        },
    }


# ---------------------------------------------------------------- output


def print_section(res: SectionResult) -> None:
    print(f"\n{res.title}  [{res.seconds:.0f} s]")
    if res.error:
        print(f"  BROKEN: {res.error}")
    if not res.figures:
        return
    width = max(len(f.label) for f in res.figures) + 2
    print(f"  {'figure':<{width}}{'median':>10} {'unit':<9} (min – max)")
    for fig in res.figures:
        print(f"  {fig.label:<{width}}{fmt_figure(fig)}")


def markdown(
    meta_: dict[str, Any], results: list[SectionResult], targets: list[dict[str, Any]]
) -> str:
    out = [
        f"Run: {meta_['date']}, {meta_['mode']} mode, git {meta_['git']}, "
        f"{meta_['machine']['cpu']} ({meta_['machine']['cpus_usable']} CPUs), "
        f"Python {meta_['python']}, load average at start "
        f"{', '.join(f'{x:.2f}' for x in meta_['machine']['loadavg_start'])}.",
    ]
    # --render of several runs: say which run each section comes from.
    out += [
        f"Sections {', '.join(src['sections'])}: run {src['date']}, git {src['git']}."
        for src in meta_.get("sources", [])
    ]
    out += [
        "",
        "| measure (median, min–max) | rapidlimit | slowapi / limits | ratio |",
        "|---|---:|---:|---:|",
    ]
    figs = {f.key: f for r in results for f in r.figures}
    for row in headline(figs):
        out.append("| " + " | ".join(row) + " |")
    out.append("")
    for res in results:
        out.append(f"#### {res.title}")
        out.append("")
        if res.error:
            out.append(f"BROKEN: {res.error}")
            out.append("")
        for s in res.skipped:
            out.append(f"- skipped: {s}")
        if res.figures:
            out += ["", "| figure | median | min – max |", "|---|---:|---:|"]
            for f in res.figures:
                spread = (
                    f"{fmt_number(f.min)} – {fmt_number(f.max)}"
                    if len(f.samples) > 1
                    else "1 run"
                )
                out.append(
                    f"| {' '.join(f.label.split())} | {fmt_number(f.median)} {f.unit} "
                    f"| {spread} |"
                )
        out.append("")
    out += ["#### Targets", "", "| target | status | measured |", "|---|---|---|"]
    for t in targets:
        out.append(f"| {t['target']} | {t['status']} | {t['detail']} |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="rapidlimit vs slowapi + limits vs no limiter",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"sections: {', '.join(SECTIONS)}",
    )
    p.add_argument("--quick", action="store_true", help="CI mode, under two minutes")
    p.add_argument("--only", nargs="+", metavar="SECTION", default=[])
    p.add_argument("--json", metavar="PATH", help="JSON output path")
    p.add_argument("--markdown", metavar="PATH", help="also write Markdown tables")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="clock of the in-process CPU-bound timings (core, asgi): wall = "
        "perf_counter_ns (default), cpu = this thread's CPU time (busy machines)",
    )
    p.add_argument("--list", action="store_true", help="list sections and exit")
    p.add_argument(
        "--render",
        nargs="+",
        metavar="JSON",
        help="print (and --markdown) the results of earlier runs instead of "
        "running; later files replace earlier files' sections",
    )
    args = p.parse_args(argv)
    if args.render:
        info, results = load(args.render)
        return report(info, results, args.json, args.markdown, save=False)
    if args.list:
        for name, mod in SECTIONS.items():
            print(f"{name:<10} {mod.TITLE}")
        return 0
    unknown = [s for s in args.only if s not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    cfg = Config(quick=args.quick, only=args.only, clock=args.clock)
    chosen = args.only or list(SECTIONS)

    started = time.monotonic()
    info = meta(cfg)
    print(
        f"rapidlimit benchmarks ({info['mode']} mode) — git {info['git']}, "
        f"{info['machine']['cpu']}, {info['machine']['cpus_usable']} CPUs, "
        f"Python {info['python']}, load average "
        f"{' '.join(f'{x:.2f}' for x in info['machine']['loadavg_start'])}"
    )
    print(
        "versions: "
        + ", ".join(
            f"{k} {v}" for k, v in info["packages"].items() if v != "not installed"
        )
    )
    print(
        f"{info['machine']['libc']}; CPU features glibc dispatches on: "
        f"{' '.join(info['machine']['cpu_features']) or '?'} "
        "(instruction counts compare between hosts that agree on these)"
    )
    if info["machine"]["loadavg_start"][0] > 0.5 * info["machine"]["cpus_usable"]:
        print(
            "WARNING: the machine is busy; timings will be noisy (callgrind is "
            "not); --clock cpu steadies the in-process ones"
        )

    results: list[SectionResult] = []
    for name in chosen:
        mod = SECTIONS[name]
        res = SectionResult(name, mod.TITLE)
        print(f"\n== {mod.TITLE}", flush=True)
        t0 = time.monotonic()
        try:
            runner: Callable[[Config, SectionResult], None] = mod.run
            runner(cfg, res)
        except Skip as exc:
            res.skip(f"whole section: {exc}")
        except BrokenBenchmark as exc:
            res.error = str(exc)
            print(f"  BROKEN: {exc}", flush=True)
        except Exception as exc:  # a crash is a broken benchmark too
            res.error = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        res.seconds = time.monotonic() - t0
        results.append(res)

    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = round(time.monotonic() - started, 1)
    return report(info, results, args.json, args.markdown, save=True)


def report(
    info: dict[str, Any],
    results: list[SectionResult],
    json_path: str | None,
    markdown_path: str | None,
    save: bool,
) -> int:
    """Prints the tables, summary and targets; writes JSON and Markdown."""
    print("\n" + "=" * 78)
    print("RESULTS (median of repetitions, min – max; ratios taken per repetition)")
    for res in results:
        print_section(res)

    figs = {f.key: f for r in results for f in r.figures}
    rows = headline(figs)
    if rows:
        print("\nSUMMARY (median, min–max)")
        w = max(len(r[0]) for r in rows) + 2
        print(
            f"  {'measure':<{w}}{'rapidlimit':>22}{'slowapi / limits':>26}{'ratio':>22}"
        )
        for r in rows:
            print(f"  {r[0]:<{w}}{r[1]:>22}{r[2]:>26}{r[3]:>22}")
    targets = [t.evaluate(figs) for t in TARGETS]
    print("\nTARGETS")
    for t in targets:
        print(f"  {t['status']:<12} {t['target']}")
        print(f"  {'':<12}   {t['detail']}")
    skipped = [(r.name, s) for r in results for s in r.skipped]
    if skipped:
        print("\nSKIPPED")
        for name, s in skipped:
            print(f"  {name}: {s}")
    broken = [r for r in results if r.error]

    if save or json_path:
        doc = {
            "meta": info,
            "sections": {r.name: r.as_json() for r in results},
            "targets": targets,
            "broken": [r.name for r in broken],
        }
        if json_path:
            out = Path(json_path)
        else:
            stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
            out = HERE / "results" / f"{stamp}-{info['mode']}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        if not json_path:
            (HERE / "results" / "latest.json").write_text(out.read_text())
        print(f"\nJSON: {out}")
    if markdown_path:
        Path(markdown_path).write_text(markdown(info, results, targets))
        print(f"Markdown: {markdown_path}")
    if save and "seconds" in info:
        print(f"total {info['seconds']:.0f} s")
    if broken:
        print(f"BROKEN BENCHMARKS: {', '.join(r.name for r in broken)}")
        return 1
    return 0


def load(paths: list[str]) -> tuple[dict[str, Any], list[SectionResult]]:
    """Results of earlier runs; a section in a later file replaces the same
    section from an earlier one (so sections run apart can be merged)."""
    info: dict[str, Any] = {}
    by_name: dict[str, SectionResult] = {}
    source_of: dict[str, dict[str, Any]] = {}
    for path in paths:
        doc = json.loads(Path(path).read_text())
        info = doc["meta"]
        for name in doc["sections"]:
            source_of[name] = doc["meta"]
        for name, sec in doc["sections"].items():
            res = SectionResult(name, sec["title"])
            res.notes, res.skipped = sec["notes"], sec["skipped"]
            res.error, res.seconds = sec["error"], sec["seconds"]
            for f in sec["figures"]:
                res.figures.append(
                    Figure(
                        f["key"],
                        f["label"],
                        f["unit"],
                        f["samples"],
                        f["better"],
                        f["note"],
                    )
                )
            by_name[name] = res
    order = [n for n in SECTIONS if n in by_name]
    if len(paths) > 1:
        sources: list[dict[str, Any]] = []
        for n in order:
            m = source_of[n]
            if not sources or sources[-1]["date"] != m["date"]:
                sources.append({"date": m["date"], "git": m["git"], "sections": []})
            sources[-1]["sections"].append(n)
        info = dict(info, sources=sources)
    return info, [by_name[n] for n in order]


if __name__ == "__main__":
    sys.exit(main())
