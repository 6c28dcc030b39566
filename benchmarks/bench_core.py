"""1. Core decisions from Python, memory store: ns per hit, against ``limits``.

As a user would time it: ``limiter.hit(item, key)`` in a Python loop over
1,000 keys round robin, the loop included. A fresh storage per repetition,
one untimed pass to create the keys. Also: the rejected path, ``decide`` and
the Google Benchmark binary of the C++ core (no Python at all) when built.
"""

from __future__ import annotations

import json
import operator
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from common import ROOT, BrokenBenchmark, Config, SectionResult, interleaved

TITLE = "1. Core decisions from Python (memory store, 1,000 keys round robin)"

STRATEGIES = (
    "fixed-window",
    "moving-window",
    "sliding-window-counter",
    "token-bucket",
)
LIMIT = "10000/minute"  # never reached: at most a few dozen hits per key
KEYS = [f"client-{i}" for i in range(1000)]


def _limits_limiter(strategy: str) -> tuple[Any, Any] | None:
    import limits
    import limits.storage
    import limits.strategies

    cls = {
        "fixed-window": "FixedWindowRateLimiter",
        "moving-window": "MovingWindowRateLimiter",
        "sliding-window-counter": "SlidingWindowCounterRateLimiter",
    }.get(strategy)
    if cls is None or not hasattr(limits.strategies, cls):
        return None
    return getattr(limits.strategies, cls)(limits.storage.MemoryStorage()), limits


def _rapid_limiter(strategy: str) -> tuple[Any, Any]:
    import rapidlimit
    import rapidlimit.storage
    import rapidlimit.strategies

    cls = rapidlimit.strategies.STRATEGIES[strategy]
    return cls(rapidlimit.storage.MemoryStorage()), rapidlimit


def _timed_hits(
    make: Callable[[], tuple[Any, Any]],
    limit: str,
    passes: int,
    method: str = "hit",
    expect: bool | None = True,
    prehit: int = 1,
    clock: Callable[[], int] = time.perf_counter_ns,
) -> Callable[[], float]:
    """A sampler: fresh limiter, `prehit` untimed passes, then `passes`
    timed passes over KEYS; returns ns per call."""

    def once() -> float:
        limiter, pkg = make()
        item = pkg.parse(limit)
        fn = getattr(limiter, method)
        keys = KEYS
        for _ in range(prehit):
            for k in keys:
                fn(item, k)
        start = clock()
        for _ in range(passes):
            for k in keys:
                fn(item, k)
        elapsed = clock() - start
        if expect is not None:
            got = limiter.hit(item, keys[0])
            if got is not expect:
                raise BrokenBenchmark(
                    f"{type(limiter).__module__}.{type(limiter).__name__} "
                    f"{limit}: hit returned {got}, expected {expect}"
                )
        return elapsed / (passes * len(keys))

    return once


def _call_floor(
    passes: int, clock: Callable[[], int] = time.perf_counter_ns
) -> Callable[[], float]:
    """The same loop calling a C builtin with two arguments."""

    def once() -> float:
        fn = operator.is_
        item = object()
        keys = KEYS
        start = clock()
        for _ in range(passes):
            for k in keys:
                fn(item, k)
        return (clock() - start) / (passes * len(keys))

    return once


def run(cfg: Config, res: SectionResult) -> None:
    reps = cfg.pick(5, 9)
    rp = cfg.pick(10, 40)  # passes for rapidlimit (1,000 hits each)
    lp = cfg.pick(1, 4)  # passes for limits (about 50x slower)
    clock = cfg.ns

    for strategy in STRATEGIES:
        variants: dict[str, Callable[[], float]] = {
            "rapidlimit": _timed_hits(
                lambda s=strategy: _rapid_limiter(s), LIMIT, rp, clock=clock
            )
        }
        if _limits_limiter(strategy) is not None:
            variants["limits"] = _timed_hits(
                lambda s=strategy: _limits_limiter(s),  # type: ignore[return-value]
                LIMIT,
                lp,
                clock=clock,
            )
        samples = interleaved(variants, reps)
        res.add(
            f"{strategy}.rapidlimit",
            f"{strategy:<23} rapidlimit hit",
            "ns/hit",
            samples["rapidlimit"],
        )
        if "limits" in samples:
            res.add(
                f"{strategy}.limits",
                f"{strategy:<23} limits hit",
                "ns/hit",
                samples["limits"],
            )
            res.ratio(
                f"{strategy}.speedup",
                f"{strategy:<23} limits/rapidlimit",
                samples["limits"],
                samples["rapidlimit"],
                better="higher",
            )
        else:
            res.log(f"{strategy}: limits {_limits_version()} has no such strategy")

    # Rejected path (fixed window, every key over its 1/minute limit), full
    # decision (remaining/reset for headers), and the bare call floor.
    variants = {
        "rejected.rapidlimit": _timed_hits(
            lambda: _rapid_limiter("fixed-window"),
            "1/minute",
            rp,
            expect=False,
            clock=clock,
        ),
        "rejected.limits": _timed_hits(
            lambda: _limits_limiter("fixed-window"),  # type: ignore[return-value]
            "1/minute",
            lp,
            expect=False,
            clock=clock,
        ),
        "decide.rapidlimit": _timed_hits(
            lambda: _rapid_limiter("fixed-window"),
            LIMIT,
            rp,
            method="decide",
            clock=clock,
        ),
        "floor": _call_floor(rp, clock),
    }
    samples = interleaved(variants, reps)
    res.add(
        "fixed-window.rejected.rapidlimit",
        "fixed-window rejected    rapidlimit hit",
        "ns/hit",
        samples["rejected.rapidlimit"],
    )
    res.add(
        "fixed-window.rejected.limits",
        "fixed-window rejected    limits hit",
        "ns/hit",
        samples["rejected.limits"],
    )
    res.ratio(
        "fixed-window.rejected.speedup",
        "fixed-window rejected    limits/rapidlimit",
        samples["rejected.limits"],
        samples["rejected.rapidlimit"],
        better="higher",
    )
    res.add(
        "fixed-window.decide.rapidlimit",
        "fixed-window decide()    rapidlimit (full decision)",
        "ns/call",
        samples["decide.rapidlimit"],
    )
    res.add(
        "call_floor",
        "call floor: operator.is_(item, key) in the same loop",
        "ns/call",
        samples["floor"],
        better="",
    )
    res.log(
        f"limit {LIMIT}, {reps} repetitions; rapidlimit {rp}k hits, "
        f"limits {lp}k hits per repetition; {cfg.clock} clock"
    )
    _google_benchmark(cfg, res)


def _limits_version() -> str:
    import limits

    return str(getattr(limits, "__version__", "?"))


# ------------------------------------------------------- Google Benchmark

_BENCH_CANDIDATES = (
    "build/bench/rapidlimit_core_bench",
    "build/cpp/rapidlimit_core_bench",
    "build-lead-tests/rapidlimit_core_bench",
)


def _find_or_build_bench(cfg: Config, res: SectionResult) -> str | None:
    env = os.environ.get("RAPIDLIMIT_CORE_BENCH")
    if env:
        return env
    if not cfg.quick:
        built = _build_bench(res)
        if built:
            return built
    for rel in _BENCH_CANDIDATES:
        path = ROOT / rel
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    return None


def _build_bench(res: SectionResult) -> str | None:
    cmake = shutil.which("cmake")
    if cmake is None:
        res.log("cmake not found: not building benchmarks/core_bench.cc")
        return None
    build = ROOT / "build" / "bench"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    try:
        subprocess.run(
            [
                cmake,
                "-S",
                str(ROOT),
                "-B",
                str(build),
                *gen,
                "-DCMAKE_BUILD_TYPE=Release",
                "-DRAPIDLIMIT_BUILD_TESTS=OFF",
                "-DRAPIDLIMIT_BUILD_BENCHMARKS=ON",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        subprocess.run(
            [cmake, "--build", str(build), "--target", "rapidlimit_core_bench"],
            check=True,
            capture_output=True,
            text=True,
        )
    except subprocess.CalledProcessError as exc:
        tail = (exc.stdout or "")[-800:] + (exc.stderr or "")[-800:]
        res.log(f"could not build core_bench (libbenchmark-dev missing?): {tail}")
        return None
    return str(build / "rapidlimit_core_bench")


def _google_benchmark(cfg: Config, res: SectionResult) -> None:
    exe = _find_or_build_bench(cfg, res)
    if exe is None:
        res.skip(
            "Google Benchmark of the C++ core: binary not built (cmake -B "
            "build/bench -DRAPIDLIMIT_BUILD_BENCHMARKS=ON; needs libbenchmark-dev)"
        )
        return
    reps = cfg.pick(3, 7)
    cmd = [
        exe,
        "--benchmark_format=json",
        f"--benchmark_repetitions={reps}",
        f"--benchmark_min_time={cfg.pick(0.05, 0.3)}",
    ]
    if cfg.quick:  # its set-up (1,000,000 keys) takes seconds per repetition
        cmd.append("--benchmark_filter=-ManyKeys")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise BrokenBenchmark(f"{exe} failed: {proc.stderr[-1000:]}")
    data = json.loads(proc.stdout)
    per_name: dict[str, list[dict[str, Any]]] = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "iteration":
            per_name.setdefault(b["run_name"], []).append(b)
    if not per_name:
        raise BrokenBenchmark(f"{exe}: no benchmark results in its JSON")
    for name, runs in per_name.items():
        # Throughput of all threads together, as ns per decision.
        ns = [1e9 / r["items_per_second"] for r in runs if r.get("items_per_second")]
        if not ns:
            ns = [float(r["real_time"]) for r in runs]
        res.add(
            f"cpp.{name}",
            f"C++ {name}",
            "ns/op",
            ns,
            note="Google Benchmark, no Python; threads share one store",
        )
    res.log(f"Google Benchmark: {exe} ({reps} repetitions)")
