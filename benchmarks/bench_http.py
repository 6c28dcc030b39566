"""3. End to end over HTTP: uvicorn (one worker) loaded by wrk.

The server is pinned to the last CPU and wrk (and Redis) to CPU 0, so client
and server do not fight over a core. Each variant gets a fresh server and a
short untimed warm-up load; its timed load runs between two loads of the
no-limiter server of the same endpoint kind, which stays up (idle in between)
for the whole section. The status codes of every response are counted
(wrk_report.lua) and must all be 200 (allowed traffic) or all 429 (rejected
traffic). Besides req/s, the server's CPU time per request (user + system, all
threads, from /proc) is recorded: less sensitive than throughput to other
tenants of a virtual machine; and so are its garbage collections (serve.py
--gc-stats: time and full collections per request), which a request
suspended while others run brings about.

The variants the end-to-end targets check (the async rapidlimit decorator,
allowed traffic, headers on and off, memory and Redis; and the ASGI
middleware on Redis, compared with it) get more repetitions than the rest,
and so does a control: a fresh no-limiter server measured
exactly as a limited variant, whose ratio to the no-limiter runs shows what
the method itself reads for two identical servers (1.0 but for noise), and a
floor: the no-limiter endpoint awaiting asyncio.sleep(0) once, suspending
each request as awaiting a Redis decision does, with nothing else added; and
that endpoint setting the four rate-limit headers too, the floor under the
Redis target with headers on. The no-limiter endpoint setting the four headers
without awaiting is the floor under the memory target with headers on: what
the server spends on the headers themselves, which any limiter sending them
pays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from apps import ROUTE, Variant
from common import (
    HERE,
    BrokenBenchmark,
    Config,
    RedisServer,
    SectionResult,
    Skip,
    cpu_count,
    free_port,
    pinned,
    proc_stat,
    rapidlimit_redis_available,
    rapidlimit_web_available,
    terminate,
    wait_port,
)

TITLE = "3. End to end over HTTP (uvicorn, 1 worker, wrk; server and client pinned)"

WRK_HINT = (
    "wrk is not installed: run scripts/install-deps.sh --bench "
    "(or: sudo apt-get install wrk)"
)


def server_cpu() -> int | None:
    n = cpu_count()
    return sorted(os.sched_getaffinity(0))[-1] if n >= 2 else None


def client_cpu() -> int | None:
    return sorted(os.sched_getaffinity(0))[0] if cpu_count() >= 2 else None


def plan(cfg: Config, packages: list[str], redis_ok: dict[str, bool]) -> list[Variant]:
    out: list[Variant] = []
    endpoints = ["async"] if cfg.quick else ["async", "sync"]
    storages = ["memory"] if cfg.quick else ["memory", "redis"]
    for ep in endpoints:
        out.append(Variant("none", endpoint=ep))
        for storage in storages:
            for traffic in ("allowed", "rejected"):
                for pkg in packages:
                    if storage == "redis" and not redis_ok.get(pkg):
                        continue
                    if cfg.quick and traffic == "rejected" and pkg != "rapidlimit":
                        continue
                    out.append(
                        Variant(
                            pkg,
                            "decorator",
                            True,
                            traffic,
                            storage_uri="redis" if storage == "redis" else "memory://",
                            endpoint=ep,
                        )
                    )
        if not cfg.quick:
            # Headers off is the default of slowapi and rapidlimit; the
            # end-to-end targets are checked with headers on and off.
            for storage in storages:
                for pkg in packages:
                    if storage == "redis" and not redis_ok.get(pkg):
                        continue
                    if pkg != "rapidlimit" and (storage, ep) != ("memory", "async"):
                        continue
                    out.append(
                        Variant(
                            pkg,
                            "decorator",
                            False,
                            "allowed",
                            storage_uri="redis" if storage == "redis" else "memory://",
                            endpoint=ep,
                        )
                    )
        if ep == "async" and not cfg.quick:
            out.append(Variant("none", endpoint=ep, control=True))
            # The four headers set by the endpoint itself: the floor under
            # the memory target with headers on.
            out.append(Variant("none", headers=True, endpoint=ep))
            # What any limiter that awaits I/O pays before its own work: the
            # request suspended once.
            out.append(Variant("none", endpoint=ep, awaits=True))
            # The same with the four headers set by the endpoint: the floor
            # under the Redis target with headers on, which pays both.
            out.append(Variant("none", headers=True, endpoint=ep, awaits=True))
            if redis_ok.get("slowapi"):
                # The same two, awaiting a Redis reply instead of one turn
                # of the loop: the floor under any limiter on Redis.
                for headers in (False, True):
                    out.append(
                        Variant(
                            "none",
                            headers=headers,
                            endpoint=ep,
                            awaits=True,
                            awaits_redis=True,
                            storage_uri="redis",
                        )
                    )
            for pkg in packages:
                out.append(Variant(pkg, "middleware", True, "allowed", endpoint=ep))
                out.append(
                    Variant(pkg, "asgi-middleware", True, "allowed", endpoint=ep)
                )
            if redis_ok.get("rapidlimit"):
                # On Redis the ASGI middleware awaits the decision before the
                # framework builds the request's objects (see is_target).
                for headers in (False, True):
                    out.append(
                        Variant(
                            "rapidlimit",
                            "asgi-middleware",
                            headers,
                            "allowed",
                            storage_uri="redis",
                            endpoint=ep,
                        )
                    )
    return out


def vkey(v: Variant) -> str:
    if v.package == "none":
        return (
            f"{v.endpoint}.none"
            + (".control" if v.control else "")
            + (".await" if v.awaits else "")
            + (".redis" if v.awaits_redis else "")
            + (".headers" if v.headers else "")
        )
    storage = "redis" if v.storage_uri.startswith("redis") else "memory"
    hdr = "headers" if v.headers else "noheaders"
    return f"{v.endpoint}.{v.package}.{storage}.{v.path}.{hdr}.{v.traffic}"


def is_baseline(v: Variant) -> bool:
    """The no-limiter server every other variant is paired with (the control
    is a no-limiter server measured as one of those variants; the floors are
    no-limiter endpoints doing more)."""
    return v.package == "none" and not (v.control or v.awaits or v.headers)


def is_target(v: Variant) -> bool:
    """The async ones of the variants whose ratio to the no-limiter run a
    target checks (rapidlimit decorator, allowed traffic; the sync ones stay
    far above the targets), the control and the floors: they get
    more repetitions than the others, since one pair of runs here varies by
    a few per cent, as much as the 97 % target leaves. So does rapidlimit on
    Redis checked by the ASGI middleware, for the comparison with the
    decorator there (the targets stay on the decorator)."""
    if v.package == "none":
        return not is_baseline(v)
    if (v.package, v.traffic, v.endpoint) != ("rapidlimit", "allowed", "async"):
        return False
    return v.path == "decorator" or (
        v.path == "asgi-middleware" and v.storage_uri.startswith("redis")
    )


def vlabel(v: Variant) -> str:
    if v.package == "none":
        if v.control:
            return f"{v.endpoint:<5} no limiter, fresh server (control)"
        if v.awaits:
            also = ", setting the headers" if v.headers else ""
            what = "a Redis PING" if v.awaits_redis else "once"
            return f"{v.endpoint:<5} no limiter, awaiting {what}{also} (floor)"
        if v.headers:
            return f"{v.endpoint:<5} no limiter, setting the headers (floor)"
        return f"{v.endpoint:<5} no limiter"
    storage = "redis" if v.storage_uri.startswith("redis") else "memory"
    hdr = "hdr" if v.headers else "nohdr"
    return (
        f"{v.endpoint:<5} {v.package:<10} {storage:<6} {v.path:<15} {hdr:<5} "
        f"{v.traffic}"
    )


@contextlib.contextmanager
def server(
    v: Variant,
    prefix: Sequence[str] = (),
    env: dict[str, str] | None = None,
    start_timeout: float = 30,
    gc_stats: str = "",
) -> Iterator[tuple[int, int]]:
    """A uvicorn server for the variant, pinned to the server CPU, run under
    ``prefix`` (bench_callgrind's valgrind) if given, counting its garbage
    collections into ``gc_stats`` if given (see gc_totals). Its stderr goes
    to a file, not a pipe: slowapi logs a warning per rejected request and a
    full pipe would stall the server. A BrokenBenchmark raised inside the
    block gets the tail of that file."""
    port = free_port()
    cmd = [
        *prefix,
        sys.executable,
        str(HERE / "serve.py"),
        f"--port={port}",
        *v.to_args(),
    ]
    if gc_stats:
        cmd.append(f"--gc-stats={gc_stats}")
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            pinned(cmd, server_cpu()),
            stdout=subprocess.DEVNULL,
            stderr=err,
            cwd=str(HERE),
            env=env,
        )

        def tail() -> str:
            err.seek(0)
            return err.read().decode(errors="replace")[-2000:]

        try:
            try:
                wait_port(port, start_timeout, proc)
            except BrokenBenchmark:
                terminate(proc)
                raise BrokenBenchmark(
                    f"{vlabel(v)}: server did not start: {tail()}"
                ) from None
            # taskset execs the server, so this pid is the server's own.
            try:
                yield port, proc.pid
            except BrokenBenchmark as e:
                terminate(proc)
                raise BrokenBenchmark(f"{e}: {tail()}") from None
        finally:
            terminate(proc)


def probe(v: Variant, port: int) -> None:
    """Two requests with urllib: the second must have the expected status
    (and rate-limit headers when they are on, a floor's included)."""
    status, headers = 0, {}
    for _ in range(2):
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}{ROUTE}", timeout=10
            ) as r:
                status, headers = r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            status, headers = e.code, dict(e.headers)
    if status != v.expected_status:
        raise BrokenBenchmark(
            f"{vlabel(v)}: probe got {status}, expected {v.expected_status}"
        )
    if v.headers:  # a limiter's, or a floor's own
        lower = {k.lower() for k in headers}
        if "x-ratelimit-limit" not in lower:
            raise BrokenBenchmark(f"{vlabel(v)}: no X-RateLimit-Limit header")


def wrk(port: int, seconds: float, connections: int) -> dict[str, float]:
    exe = shutil.which("wrk")
    assert exe
    cmd = [
        exe,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--latency",
        "-s",
        str(HERE / "wrk_report.lua"),
        f"http://127.0.0.1:{port}{ROUTE}",
    ]
    proc = subprocess.run(
        pinned(cmd, client_cpu()), capture_output=True, text=True, timeout=seconds + 60
    )
    if proc.returncode != 0:
        raise BrokenBenchmark(f"wrk failed ({proc.returncode}): {proc.stderr[-1000:]}")
    out: dict[str, float] = {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if not parts or parts[0] != "BENCH":
            continue
        if parts[1] == "status":
            out[f"status_{parts[2]}"] = float(parts[3])
        elif parts[1] == "errors":
            out["socket_errors"] = float(
                sum(int(x) for x in parts[2:7]) - int(parts[5])
            )
        else:
            out[parts[1]] = float(parts[2])
    if "requests" not in out:
        raise BrokenBenchmark(f"wrk printed no report: {proc.stdout[-1000:]}")
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = proc_stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def gc_totals(pid: int, path: str) -> tuple[list[int], list[float]]:
    """The server's garbage collections since start-up, per generation:
    counts and seconds (serve.py --gc-stats writes them on SIGHUP)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise BrokenBenchmark("the server wrote no garbage collection totals")
        time.sleep(0.005)
    with open(path) as f:
        got = json.load(f)
    return got["collections"], got["seconds"]


class Server(NamedTuple):
    port: int
    pid: int
    gc_stats: str


def start(
    v: Variant, cfg: Config, connections: int, stack: contextlib.ExitStack
) -> Server:
    """Starts, probes and warms up the variant's server."""
    gc_stats = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "gc")
    port, pid = stack.enter_context(server(v, gc_stats=gc_stats))
    probe(v, port)
    wrk(port, cfg.pick(1, 2), connections)  # warm-up, not counted
    return Server(port, pid, gc_stats)


def measure(
    v: Variant, srv: Server, seconds: float, connections: int
) -> dict[str, float]:
    """One timed wrk load; adds req/s, the server's CPU µs per request, its
    time in garbage collection per request and its full collections per
    10,000 requests."""
    n0, s0 = gc_totals(srv.pid, srv.gc_stats)
    cpu0 = cpu_seconds(srv.pid)
    r = wrk(srv.port, seconds, connections)
    cpu = cpu_seconds(srv.pid) - cpu0
    n1, s1 = gc_totals(srv.pid, srv.gc_stats)
    statuses = {k: n for k, n in r.items() if k.startswith("status_")}
    want = f"status_{v.expected_status}"
    total = sum(statuses.values())
    if total == 0 or statuses.get(want, 0) != total:
        raise BrokenBenchmark(
            f"{vlabel(v)}: expected every response {v.expected_status}, got "
            f"{ {k[7:]: int(n) for k, n in statuses.items()} }"
        )
    r["rps"] = r["requests"] / (r["duration_us"] / 1e6)
    r["cpu_us"] = cpu * 1e6 / r["requests"]
    r["gc_us"] = (sum(s1) - sum(s0)) * 1e6 / r["requests"]
    r["gc_full"] = (n1[2] - n0[2]) * 1e4 / r["requests"]
    return r


def run(cfg: Config, res: SectionResult) -> None:
    if shutil.which("wrk") is None:
        if cfg.quick:
            raise Skip(WRK_HINT)
        raise BrokenBenchmark(WRK_HINT)
    if cpu_count() < 2:
        res.log("only one CPU: server and wrk are not pinned apart")
    seconds = float(os.environ.get("BENCH_HTTP_SECONDS", cfg.pick(2, 5)))
    reps = int(os.environ.get("BENCH_HTTP_REPS", cfg.pick(1, 3)))
    target_reps = max(
        reps, int(os.environ.get("BENCH_HTTP_TARGET_REPS", cfg.pick(1, 9)))
    )
    connections = int(os.environ.get("BENCH_HTTP_CONNECTIONS", 16))

    packages = ["slowapi"]
    why = rapidlimit_web_available()
    if why:
        res.skip(f"rapidlimit variants: {why}")
    else:
        packages.append("rapidlimit")

    with contextlib.ExitStack() as stack:
        redis_ok: dict[str, bool] = {}
        redis_uri = rapid_redis_uri = ""
        if not cfg.quick:
            try:
                rs = stack.enter_context(RedisServer(cpu=client_cpu()))
                redis_uri = rs.uri
                rapid_redis_uri = rs.rapid_uri
                redis_ok["slowapi"] = True
                why = rapidlimit_redis_available(rs.rapid_uri)
                if why:
                    res.skip(f"rapidlimit Redis variants: {why}")
                else:
                    redis_ok["rapidlimit"] = "rapidlimit" in packages
            except Skip as exc:
                res.skip(f"Redis variants: {exc}")
        variants = plan(cfg, packages, redis_ok)
        if redis_uri:
            variants = [
                dataclasses.replace(
                    v,
                    storage_uri=rapid_redis_uri
                    if v.package == "rapidlimit"
                    else redis_uri,
                    key_prefix=vkey(v),
                )
                if v.storage_uri == "redis"
                else v
                for v in variants
            ]

        results: dict[str, list[dict[str, float]]] = {vkey(v): [] for v in variants}
        # The no-limiter server of each endpoint kind stays up all section
        # (idle between its loads) and is loaded right before and right after
        # every limited variant: each ratio compares runs seconds apart, so
        # the drift of a shared machine hits both sides alike.
        paired: dict[str, list[float]] = {vkey(v): [] for v in variants}
        paired_cpu: dict[str, list[float]] = {vkey(v): [] for v in variants}
        baselines = {v.endpoint: v for v in variants if is_baseline(v)}
        base_srv = {
            ep: start(b, cfg, connections, stack) for ep, b in baselines.items()
        }
        limited = [v for v in variants if not is_baseline(v)]

        def base_run(ep: str) -> dict[str, float]:
            b = measure(baselines[ep], base_srv[ep], seconds, connections)
            results[vkey(baselines[ep])].append(b)
            return b

        started = time.monotonic()
        for rep in range(target_reps):
            # The run just before, if it was this endpoint kind's baseline.
            before: tuple[str, dict[str, float]] | None = None
            now = [v for v in limited if rep < reps or is_target(v)]
            # Rotate the order: the same order each time would favour the
            # first variants on a machine that heats up.
            shift = rep % len(now) if now else 0
            for v in now[shift:] + now[:shift]:
                ep = v.endpoint
                with contextlib.ExitStack() as vs:
                    srv = start(v, cfg, connections, vs)
                    b0 = before[1] if before and before[0] == ep else base_run(ep)
                    r = measure(v, srv, seconds, connections)
                results[vkey(v)].append(r)
                b1 = base_run(ep)
                before = (ep, b1)
                paired[vkey(v)].append((b0["rps"] + b1["rps"]) / 2)
                paired_cpu[vkey(v)].append((b0["cpu_us"] + b1["cpu_us"]) / 2)
        res.log(
            f"{reps} repetition(s) x {len(limited)} variants ({target_reps} for "
            "the async rapidlimit decorator with allowed traffic, the ASGI "
            "middleware on Redis, the control and the floors), each between two "
            f"runs of the no-limiter server; {seconds:g} s per run, "
            f"wrk -t1 -c{connections}; server CPU {server_cpu()}, wrk and Redis "
            f"CPU {client_cpu()}; {time.monotonic() - started:.0f} s"
        )

    by_key = {vkey(v): v for v in variants}
    for k, runs in results.items():
        v = by_key[k]
        rps = [r["rps"] for r in runs]
        res.add(f"{k}.rps", f"{vlabel(v)}: throughput", "req/s", rps, better="higher")
        res.add(
            f"{k}.p50",
            f"{vlabel(v)}: p50 latency",
            "ms",
            [r["latency_p50_us"] / 1000 for r in runs],
        )
        res.add(
            f"{k}.p99",
            f"{vlabel(v)}: p99 latency",
            "ms",
            [r["latency_p99_us"] / 1000 for r in runs],
        )
        errors = sum(r.get("socket_errors", 0) for r in runs)
        if errors:
            res.log(
                f"{vlabel(v)}: {int(errors)} socket errors/timeouts reported by wrk"
            )
        res.add(
            f"{k}.cpu",
            f"{vlabel(v)}: server CPU per request",
            "µs",
            [r["cpu_us"] for r in runs],
        )
        res.add(
            f"{k}.gc",
            f"{vlabel(v)}: server time in garbage collection per request",
            "µs",
            [r["gc_us"] for r in runs],
        )
        res.add(
            f"{k}.gc_full",
            f"{vlabel(v)}: full garbage collections per 10,000 requests",
            "per 10k",
            [r["gc_full"] for r in runs],
        )
        if not is_baseline(v):
            res.ratio(
                f"{k}.vs_none",
                f"{vlabel(v)}: throughput / no limiter",
                rps,
                paired[k],
                better="higher",
                note="against the mean of the no-limiter runs just before and after",
            )
            res.ratio(
                f"{k}.cpu_vs_none",
                f"{vlabel(v)}: server CPU per request / no limiter",
                [r["cpu_us"] for r in runs],
                paired_cpu[k],
                better="lower",
                note="user + system time of the server process, all threads",
            )
    # Reject path against allowed path, same package/storage/endpoint.
    for k, v in by_key.items():
        if v.traffic == "rejected" and v.package != "none":
            allowed = k[: -len("rejected")] + "allowed"
            if allowed in results:
                # The allowed variant may have had more repetitions: its
                # first ones ran in the same repetitions as these.
                n = len(results[k])
                res.ratio(
                    f"{k[: -len('.rejected')]}.rejected_over_allowed",
                    f"{vlabel(v).rsplit(' ', 1)[0]}: rejected/allowed throughput",
                    [r["rps"] for r in results[k]],
                    [r["rps"] for r in results[allowed][:n]],
                    better="higher",
                )
