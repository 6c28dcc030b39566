"""6. Instructions per hit under ``valgrind --tool=callgrind``.

Instruction counts barely move on a noisy machine: this is the figure to
watch for regressions. Each subject runs twice under callgrind, with n1 and
n2 operations after the same setup and warm-up; (Ir(n2) - Ir(n1)) / (n2 - n1)
is the cost of one operation with interpreter start-up, imports and set-up
cancelled out. The ``http.*`` subjects are a uvicorn server (serve.py, as in
section 3) run under callgrind and loaded over HTTP by 16 keep-alive
connections from this process: the end-to-end comparison with no limiter,
free of the virtual machine's noise (user-space instructions only: the
kernel's share of a request, its system calls, is not counted), next to two
no-limiter floors that tell the limiter's own cost from what any limiter
pays: the endpoint setting the four rate-limit headers itself, and the
endpoint suspended once (``asyncio.sleep(0)``) as a request awaiting Redis
is. ``bench_callgrind.py http [--http httptools] SUBJECT...`` measures http
subjects by hand, with uvicorn's httptools protocol too. When a C
compiler is at hand, a tiny helper (callgrind.h client requests, loaded with
ctypes) switches instrumentation on only around the measured loop
(``--instr-atstart=no``), which makes each run several times faster; the
figures are the same; the http subjects need it. PYTHONHASHSEED is fixed so that runs
are repeatable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import bench_http
import redis_callgrind
from common import (
    HERE,
    BrokenBenchmark,
    Config,
    RedisServer,
    SectionResult,
    Skip,
    callgrind_total,
    proc_stat,
    rapidlimit_redis_available,
)

TITLE = "6. Instructions per operation (valgrind --tool=callgrind)"

# subject -> (n1, n2, quick?); hits in whole passes over 1,000 keys
SUBJECTS: dict[str, tuple[int, int, bool]] = {
    "rapidlimit.fixed-window": (2_000, 22_000, True),
    "limits.fixed-window": (1_000, 3_000, True),
    "rapidlimit.fixed-window.rejected": (2_000, 22_000, False),
    "rapidlimit.fixed-window.decide": (2_000, 22_000, False),
    "rapidlimit.moving-window": (2_000, 22_000, False),
    "rapidlimit.sliding-window-counter": (2_000, 22_000, False),
    "rapidlimit.token-bucket": (2_000, 22_000, False),
    "limits.moving-window": (1_000, 3_000, False),
    "limits.sliding-window-counter": (1_000, 3_000, False),
    "asgi.none": (50, 250, False),
    "asgi.rapidlimit": (50, 250, False),
    "asgi.slowapi": (50, 250, False),
    # The same route's limit as a default limit, checked by
    # SlowAPIASGIMiddleware (rapidlimit's mw_decide path), headers on.
    "asgi.rapidlimit.asgi-middleware": (50, 250, False),
    "asgi.slowapi.asgi-middleware": (50, 250, False),
    # A uvicorn server (asyncio + h11) under callgrind, loaded over HTTP by
    # 16 keep-alive connections: the end-to-end figures without the VM's
    # noise. Instructions of all the server's threads.
    "http.none": (100, 500, False),
    # No limiter, the endpoint adding the four headers a limiter with
    # headers on sends: what carrying them costs the server whoever sets them.
    "http.none.headers": (100, 500, False),
    # No limiter, the endpoint awaiting asyncio.sleep(0) once: what a request
    # suspended on its Redis decision costs whatever it waits for.
    "http.none.await": (100, 500, False),
    # Both: the floor under rapidlimit on Redis with headers on.
    "http.none.await.headers": (100, 500, False),
    "http.rapidlimit": (100, 500, False),
    "http.rapidlimit.headers": (100, 500, False),
    "http.rapidlimit.headers.rejected": (100, 500, False),
    "http.rapidlimit.redis": (100, 500, False),
    "http.rapidlimit.redis.headers": (100, 500, False),
    # The same limit checked by SlowAPIASGIMiddleware (the route's default
    # limit) rather than the decorator: it awaits Redis before the framework
    # builds the request's objects.
    "http.rapidlimit.redis.asgi": (100, 500, False),
    "http.slowapi": (100, 500, False),
}
HTTP_CONNECTIONS = 16
RATIOS = (
    ("fixed-window", "limits.fixed-window", "rapidlimit.fixed-window"),
    ("moving-window", "limits.moving-window", "rapidlimit.moving-window"),
    (
        "sliding-window-counter",
        "limits.sliding-window-counter",
        "rapidlimit.sliding-window-counter",
    ),
)


# ------------------------------------------------------------------ worker

_TOGGLE_C = r"""
#include <valgrind/callgrind.h>
void rl_cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void rl_cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


class _Toggle:
    """Switches callgrind's instrumentation around the measured loop."""

    def __init__(self) -> None:
        path = os.environ.get("RL_CG_TOGGLE")
        self.lib: Any = None
        if path:
            import ctypes

            self.lib = ctypes.CDLL(path)

    def start(self) -> None:
        if self.lib is not None:
            self.lib.rl_cg_start()

    def stop(self) -> None:
        if self.lib is not None:
            self.lib.rl_cg_stop()


def _worker(subject: str, n: int) -> None:
    toggle = _Toggle()
    lib, _, rest = subject.partition(".")
    if lib == "asgi":
        import asyncio

        from apps import Driver, Variant, make_app, prime

        package, _, path = rest.partition(".")
        v = Variant(package, path or "decorator", headers=package != "none")
        loop = asyncio.new_event_loop()
        d = Driver(make_app(v))
        prime(loop, v, d)
        loop.run_until_complete(d.run(20))
        coro = d.run(n)
        toggle.start()
        loop.run_until_complete(coro)
        toggle.stop()
        return
    strategy = rest
    method = "hit"
    # (at most 2**20 for the moving window, which logs every hit)
    limit = "1000000/minute"
    expect = True
    if strategy.endswith(".rejected"):
        strategy, limit, expect = strategy.removesuffix(".rejected"), "1/minute", False
    if strategy.endswith(".decide"):
        strategy, method = strategy.removesuffix(".decide"), "decide"
    limiter: Any
    if lib == "rapidlimit":
        import rapidlimit as pkg
        import rapidlimit.storage
        import rapidlimit.strategies

        limiter = rapidlimit.strategies.STRATEGIES[strategy](
            rapidlimit.storage.MemoryStorage()
        )
    else:
        import limits as pkg  # type: ignore[no-redef]
        import limits.storage
        import limits.strategies

        cls = {
            "fixed-window": limits.strategies.FixedWindowRateLimiter,
            "moving-window": limits.strategies.MovingWindowRateLimiter,
            "sliding-window-counter": limits.strategies.SlidingWindowCounterRateLimiter,
        }[strategy]
        limiter = cls(limits.storage.MemoryStorage())
    item = pkg.parse(limit)
    fn = getattr(limiter, method)
    keys = [f"client-{i}" for i in range(1000)]
    for k in keys:  # warm-up: every key exists
        fn(item, k)
    for k in keys:
        fn(item, k)
    passes = n // len(keys)  # the loop of the core section, whole passes
    toggle.start()
    for _ in range(passes):
        for k in keys:
            fn(item, k)
    toggle.stop()
    if limiter.hit(item, keys[0]) is not expect:
        raise SystemExit(f"{subject}: hit did not return {expect}")
    if lib == "limits":
        limiter.storage.timer.cancel()


# ------------------------------------------------------------------ driver


def _build_toggle(tmp: Path) -> str:
    """Compiles the instrumentation switch; '' if it cannot be built."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None or not Path("/usr/include/valgrind/callgrind.h").exists():
        return ""
    src = tmp / "rl_cg_toggle.c"
    lib = tmp / "rl_cg_toggle.so"
    src.write_text(_TOGGLE_C)
    proc = subprocess.run(
        [cc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)],
        capture_output=True,
        text=True,
    )
    return str(lib) if proc.returncode == 0 else ""


def _instructions(subject: str, n: int, tmp: Path, toggle: str) -> int:
    out = tmp / f"cg.{subject}.{n}.out"
    env = dict(os.environ, PYTHONHASHSEED="0")
    if toggle:
        env["RL_CG_TOGGLE"] = toggle
    cmd = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-line=no",
        *(["--instr-atstart=no"] if toggle else []),
        sys.executable,
        str(HERE / "bench_callgrind.py"),
        "worker",
        subject,
        str(n),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, cwd=str(HERE), env=env, timeout=1800
    )
    if proc.returncode != 0:
        raise BrokenBenchmark(
            f"callgrind {subject} n={n} failed: {proc.stderr[-1500:]}"
        )
    return callgrind_total(out, subject)


def _http_variant(subject: str, redis_uri: str, http: str = "h11") -> Any:
    from apps import Variant

    parts = subject.split(".")[1:]
    return Variant(
        package=parts[0],
        headers="headers" in parts,
        traffic="rejected" if "rejected" in parts else "allowed",
        storage_uri=redis_uri if "redis" in parts else "memory://",
        http=http,
        awaits="await" in parts,
        path="asgi-middleware" if "asgi" in parts else "decorator",
    )


async def _load(port: int, n: int, connections: int) -> dict[int, int]:
    """Sends exactly ``n`` GET requests over keep-alive connections and
    counts the status codes."""
    import asyncio

    from apps import ROUTE

    statuses: dict[int, int] = {}
    left = n
    request = f"GET {ROUTE} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()

    async def one_connection() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split()[1])
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(one_connection() for _ in range(connections)))
    return statuses


def _wait_exit(pid: int, timeout: float) -> None:
    """Waits for the child ``pid`` to exit, leaving it to its Popen to reap
    (a zombie has exited)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if proc_stat(pid)[0] in ("Z", "X"):
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    raise BrokenBenchmark(f"server {pid} still running {timeout:g} s after SIGINT")


def _http_instructions(
    subject: str, n: int, tmp: Path, toggle: str, redis_uri: str, http: str = "h11"
) -> int:
    """The server's instructions over a load of ``n`` requests (the switch
    goes on and off around it, each followed by one request so that the
    server has run its handler; both runs of a subject count those)."""
    import asyncio
    import signal

    v = _http_variant(subject, redis_uri, http)
    out = tmp / f"cg.{subject}.{n}.out"
    env = dict(os.environ, PYTHONHASHSEED="0", RL_CG_TOGGLE=toggle)
    valgrind = [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        "--dump-line=no",
        "--instr-atstart=no",
    ]
    with bench_http.server(v, valgrind, env, start_timeout=600) as (port, pid):
        # Warm-up (a rejected variant's limit is used up by it).
        loads = [asyncio.run(_load(port, 20, 4))]
        os.kill(pid, signal.SIGUSR1)
        loads.append(asyncio.run(_load(port, 1, 1)))
        loads.append(asyncio.run(_load(port, n, HTTP_CONNECTIONS)))
        os.kill(pid, signal.SIGUSR2)
        loads.append(asyncio.run(_load(port, 1, 1)))
        for got in loads[1:]:
            if set(got) != {v.expected_status}:
                raise BrokenBenchmark(f"callgrind {subject}: statuses {got}")
        # Callgrind writes its counts as the server exits.
        os.kill(pid, signal.SIGINT)
        _wait_exit(pid, 300)
    return callgrind_total(out, subject)


def _http_prerequisites(toggle: str, stack: contextlib.ExitStack) -> tuple[str, str]:
    """The Redis URI for the http subjects and why some cannot run ('' if
    all can). They need the instrumentation switch (a C compiler); the Redis
    one needs redis-server and rapidlimit built with hiredis."""
    if not toggle:
        return "", "http subjects: no C compiler for the instrumentation switch"
    try:
        rs = stack.enter_context(RedisServer(cpu=bench_http.client_cpu()))
    except Skip as e:
        return "", f"http.rapidlimit.redis: {e}"
    why = rapidlimit_redis_available(rs.rapid_uri)
    if why:
        return "", f"http.rapidlimit.redis: {why}"
    return rs.rapid_uri, ""


def run(cfg: Config, res: SectionResult) -> None:
    if shutil.which("valgrind") is None:
        msg = "valgrind not installed (scripts/install-deps.sh --bench)"
        if cfg.quick:
            raise Skip(msg)
        raise BrokenBenchmark(msg)
    reps = cfg.pick(1, 3)
    subjects = [s for s, (_, _, q) in SUBJECTS.items() if q or not cfg.quick]
    per_op: dict[str, list[float]] = {}
    with (
        tempfile.TemporaryDirectory(prefix="rl-callgrind-") as tmpdir,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmpdir)
        toggle = _build_toggle(tmp)
        redis_uri = ""
        if any(s.startswith("http.") for s in subjects):
            redis_uri, why = _http_prerequisites(toggle, stack)
            if why:
                res.skip(why)
                subjects = [
                    s
                    for s in subjects
                    if not s.startswith("http.")
                    or (toggle and "redis" not in s.split("."))
                ]
        for subject in subjects:
            n1, n2, _ = SUBJECTS[subject]
            samples = []
            for _ in range(reps):
                if subject.startswith("http."):
                    b = _http_instructions(subject, n2, tmp, toggle, redis_uri)
                    a = _http_instructions(subject, n1, tmp, toggle, redis_uri)
                    samples.append((b - a) / (n2 - n1))
                    continue
                b = _instructions(subject, n2, tmp, toggle)
                if cfg.quick and toggle:
                    # Only the loop is instrumented: one run is enough (the
                    # switch's own cost, a few hundred instructions, is
                    # spread over n2 operations).
                    samples.append(b / n2)
                    continue
                a = _instructions(subject, n1, tmp, toggle)
                samples.append((b - a) / (n2 - n1))
            per_op[subject] = samples
            unit = (
                "Ir/hit"
                if subject.split(".")[0] in ("rapidlimit", "limits")
                else "Ir/req"
            )
            res.add(subject, f"{subject}", unit, samples)
    for name, lim, rap in RATIOS:
        if lim in per_op and rap in per_op:
            res.ratio(
                f"{name}.ratio",
                f"{name}: limits/rapidlimit instructions",
                per_op[lim],
                per_op[rap],
                better="higher",
            )
    for subject, samples in per_op.items():
        if subject.startswith("asgi.") and subject != "asgi.none":
            if "asgi.none" not in per_op:
                continue
            path = subject.split(".", 2)[2] if subject.count(".") > 1 else "decorator"
            res.add(
                f"{subject}.added",
                f"{subject} ({path}, headers on): added over no limiter",
                "Ir/req",
                [a - b for a, b in zip(samples, per_op["asgi.none"])],
            )
    rejected, allowed = "http.rapidlimit.headers.rejected", "http.rapidlimit.headers"
    if rejected in per_op and allowed in per_op:
        res.ratio(
            "http.rapidlimit.headers.rejected.vs_allowed",
            f"{rejected}: server instructions per request / allowed",
            per_op[rejected],
            per_op[allowed],
            better="lower",
        )
    for floor, rap, what in (
        ("http.none.headers", "http.rapidlimit.headers", "sending the same headers"),
        ("http.none.await", "http.rapidlimit.redis", "awaiting once"),
        ("http.none.await", "http.rapidlimit.redis.asgi", "awaiting once"),
        (
            "http.none.await.headers",
            "http.rapidlimit.redis.headers",
            "awaiting once and sending the same headers",
        ),
    ):
        if floor in per_op and rap in per_op:
            res.ratio(
                f"{rap}.vs_{floor[5:].replace('.', '_')}",
                f"{rap}: server instructions per request / no limiter {what}",
                per_op[rap],
                per_op[floor],
                better="lower",
            )
    for subject, samples in per_op.items():
        if (
            subject.startswith("http.")
            and subject != "http.none"
            and "http.none" in per_op
        ):
            res.ratio(
                f"{subject}.vs_none",
                f"{subject}: server instructions per request / no limiter",
                samples,
                per_op["http.none"],
                better="lower",
            )
    _redis_server(cfg, res, reps)
    method = (
        "one run, instrumented loop / n2"
        if cfg.quick and toggle
        else "difference of two runs with n1 and n2 operations"
    )
    res.log(
        f"{reps} run(s) per subject; PYTHONHASHSEED=0; per-op = {method}; "
        "instrumentation "
        + ("around the loop only" if toggle else "from the start (no C compiler)")
    )


def _redis_server(cfg: Config, res: SectionResult, reps: int) -> None:
    """The ``redis.*`` figures: a redis-server's own instructions per
    decision (redis_callgrind.py), rapidlimit's script against ``limits``'
    commands and the floor of any script call."""
    strategies = cfg.pick(("fixed-window",), redis_callgrind.STRATEGIES)
    n = cfg.pick(512, 1024)  # whole batches of SHARED
    got: dict[str, list[float]] = {}
    try:
        with redis_callgrind.CountingServer() as cs:
            why = rapidlimit_redis_available(cs.rapid_uri)
            if why:
                res.skip(f"redis server instructions: {why}")
                return
            for _ in range(reps):
                for strategy in strategies:
                    for call, v in redis_callgrind.rapidlimit_decisions(
                        cs, strategy, n
                    ).items():
                        got.setdefault(f"rapidlimit.{strategy}.{call}", []).append(v)
                for stats, name in ((False, "hit"), (True, "hit_stats")):
                    got.setdefault(f"limits.fixed-window.{name}", []).append(
                        redis_callgrind.limits_hits(cs, n, stats)
                    )
                got.setdefault("empty-script", []).append(
                    redis_callgrind.empty_script(cs, n)
                )
    except Skip as e:
        res.skip(f"redis server instructions: {e}")
        return
    labels = {
        "lone": "one request at a time",
        "shared": f"{redis_callgrind.SHARED} awaited together",
        "hit": "hit",
        "hit_stats": "hit + get_window_stats (slowapi, headers on)",
    }
    for key, samples in got.items():
        if key == "empty-script":
            label = "redis-server: EVALSHA of a script that returns at once"
            unit = "Ir/call"
        else:
            lib, strategy, call = key.split(".")
            label = f"redis-server: {lib} {strategy}, {labels[call]}"
            unit = "Ir/decision"
        res.add(f"redis.{key}", label, unit, samples)
    lone = got["rapidlimit.fixed-window.lone"]
    for floor, what in (
        ("limits.fixed-window.hit", "limits' hit"),
        ("limits.fixed-window.hit_stats", "limits' hit + window stats"),
        ("empty-script", "an empty script's call"),
    ):
        res.ratio(
            f"redis.fixed-window.lone.vs_{floor.split('.')[-1].replace('-', '_')}",
            f"redis-server: rapidlimit fixed-window decision / {what}",
            lone,
            got[floor],
            better="lower",
        )
    res.log(
        f"redis-server under callgrind: {n} decisions per figure on "
        f"{len(redis_callgrind.KEYS)} live keys, whole server (command, script, "
        "reply); by hand: benchmarks/redis_callgrind.py"
    )


def _by_hand(argv: list[str]) -> None:
    """``http [--http httptools] [--redis] SUBJECT...``: the server's
    instructions per request for http subjects, one run pair each, printed
    (for comparisons the suite does not make, such as uvicorn's httptools
    protocol)."""
    import argparse

    p = argparse.ArgumentParser(prog="bench_callgrind.py http")
    p.add_argument("--http", default="h11", choices=("h11", "httptools"))
    p.add_argument(
        "subjects", nargs="+", choices=[s for s in SUBJECTS if s[:5] == "http."]
    )
    a = p.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="rl-callgrind-") as tmpdir,
        contextlib.ExitStack() as stack,
    ):
        tmp = Path(tmpdir)
        toggle = _build_toggle(tmp)
        redis_uri, why = _http_prerequisites(toggle, stack)
        if not toggle:
            raise SystemExit(why)
        for subject in a.subjects:
            if "redis" in subject.split(".") and not redis_uri:
                raise SystemExit(why)
            n1, n2, _ = SUBJECTS[subject]
            b = _http_instructions(subject, n2, tmp, toggle, redis_uri, a.http)
            c = _http_instructions(subject, n1, tmp, toggle, redis_uri, a.http)
            print(
                f"{subject} ({a.http}): {(b - c) / (n2 - n1):,.0f} Ir/req", flush=True
            )


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _worker(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "http":
        _by_hand(sys.argv[2:])
    else:
        raise SystemExit(
            "usage: bench_callgrind.py worker SUBJECT N\n"
            "       bench_callgrind.py http [--http httptools] SUBJECT..."
        )
