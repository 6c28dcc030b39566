"""5. Memory: bytes per key, and a flood of random keys against a key cap.

Every measurement runs in a fresh interpreter (this file in worker mode), so
the RSS growth belongs to the storage alone: keys are generated on the fly
and not kept. rapidlimit's memory store keeps a keyed 96-bit hash, not the
key, so its bytes per key are all overhead; ``limits`` keeps the key strings
(shown separately, since the target counts bytes beyond the key's own).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from typing import Any

from common import HERE, BrokenBenchmark, Config, SectionResult, rss_bytes

TITLE = "5. Memory (fixed window unless noted; fresh process per figure)"


def _make(lib: str, strategy: str, max_keys: int) -> tuple[Any, Any, Any]:
    if lib == "rapidlimit":
        import rapidlimit
        import rapidlimit.storage
        import rapidlimit.strategies

        storage = rapidlimit.storage.MemoryStorage(max_keys=max_keys)
        limiter = rapidlimit.strategies.STRATEGIES[strategy](storage)
        return storage, limiter, rapidlimit
    import limits
    import limits.storage
    import limits.strategies

    cls = {
        "fixed-window": limits.strategies.FixedWindowRateLimiter,
        "moving-window": limits.strategies.MovingWindowRateLimiter,
        "sliding-window-counter": limits.strategies.SlidingWindowCounterRateLimiter,
    }[strategy]
    storage = limits.storage.MemoryStorage()
    return storage, cls(storage), limits


def worker_keys(lib: str, strategy: str, nkeys: int) -> dict[str, Any]:
    storage, limiter, pkg = _make(lib, strategy, max(nkeys * 2, 1_000_000))
    item = pkg.parse("100/minute")
    hit = limiter.hit
    # Warm the allocator and the interpreter, then measure from here.
    hit(item, "warm-up")
    gc.collect()
    rss0 = rss_bytes()
    mem0 = storage.memory_bytes() if lib == "rapidlimit" else 0
    start = time.perf_counter_ns()
    for i in range(nkeys):
        hit(item, f"k{i:09d}")
    elapsed = time.perf_counter_ns() - start
    gc.collect()
    rss1 = rss_bytes()
    out: dict[str, Any] = {
        "rss_per_key": (rss1 - rss0) / nkeys,
        "ns_per_hit": elapsed / nkeys,
        "keys": len(storage) if lib == "rapidlimit" else len(storage.storage),
    }
    if lib == "rapidlimit":
        out["memory_bytes_per_key"] = (storage.memory_bytes() - mem0) / nkeys
    else:
        # The key string limits keeps: "LIMITER/k000000001/100/1/minute".
        out["key_bytes"] = sys.getsizeof(item.key_for("k000000001"))
    return out


def worker_flood(lib: str, nflood: int, cap: int) -> dict[str, Any]:
    """Random keys (one hit each) with a hot key limited to 10/minute hit
    every 100 flood keys: how many of the hot key's hits are allowed tells
    whether eviction forgot it."""
    import random

    storage, limiter, pkg = _make(lib, "fixed-window", cap)
    item = pkg.parse("100/minute")
    hot_item = pkg.parse("10/minute")
    hit = limiter.hit
    rnd = random.Random(1234)
    hit(item, "warm-up")
    gc.collect()
    rss0 = rss_bytes()
    hot_allowed = hot_hits = 0
    start = time.perf_counter_ns()
    for i in range(nflood):
        hit(item, f"{rnd.getrandbits(64):016x}")
        if i % 100 == 0:
            hot_hits += 1
            hot_allowed += bool(hit(hot_item, "hot-client"))
    elapsed = time.perf_counter_ns() - start
    gc.collect()
    out: dict[str, Any] = {
        "rss_growth": rss_bytes() - rss0,
        "ns_per_hit": elapsed / (nflood + hot_hits),
        "hot_hits": hot_hits,
        "hot_allowed": hot_allowed,
        "keys": len(storage) if lib == "rapidlimit" else len(storage.storage),
    }
    if lib == "rapidlimit":
        out["memory_bytes"] = storage.memory_bytes()
        out["max_keys"] = storage.max_keys
    return out


def _worker(*args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(HERE / "bench_memory.py"), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(HERE),
    )
    if proc.returncode != 0:
        raise BrokenBenchmark(f"memory worker {args} failed: {proc.stderr[-1500:]}")
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def run(cfg: Config, res: SectionResult) -> None:
    sizes = cfg.pick([100_000], [100_000, 1_000_000])
    reps = cfg.pick(2, 3)
    for n in sizes:
        for lib in ("rapidlimit", "limits"):
            runs = [_worker("keys", lib, "fixed-window", str(n)) for _ in range(reps)]
            for r in runs:
                if r["keys"] < n:
                    raise BrokenBenchmark(
                        f"{lib}: {r['keys']} keys stored, expected {n}"
                    )
            label = f"{lib:<10} {n:>9,} keys"
            res.add(
                f"{lib}.{n}.rss_per_key",
                f"{label}: RSS growth per key",
                "B/key",
                [r["rss_per_key"] for r in runs],
            )
            if lib == "rapidlimit":
                res.add(
                    f"{lib}.{n}.memory_bytes_per_key",
                    f"{label}: memory_bytes() per key",
                    "B/key",
                    [r["memory_bytes_per_key"] for r in runs],
                )
            elif n == sizes[0]:
                res.log(
                    f"limits keeps each key string ({runs[0]['key_bytes']} bytes "
                    "for 'LIMITER/k000000001/100/1/minute') in its RSS per key"
                )
            res.add(
                f"{lib}.{n}.ns_per_new_key",
                f"{label}: ns per hit on a new key (incl. making the key)",
                "ns/hit",
                [r["ns_per_hit"] for r in runs],
            )
    if not cfg.quick:
        for strategy in ("moving-window", "sliding-window-counter", "token-bucket"):
            runs = [
                _worker("keys", "rapidlimit", strategy, "100000") for _ in range(reps)
            ]
            res.add(
                f"rapidlimit.100000.{strategy}.memory_bytes_per_key",
                f"rapidlimit   100,000 keys {strategy}: memory_bytes() per key",
                "B/key",
                [r["memory_bytes_per_key"] for r in runs],
            )

    # Flood of random keys against a key cap.
    nflood = cfg.pick(200_000, 1_000_000)
    cap = 10_000
    floods = [
        _worker("flood", "rapidlimit", str(nflood), str(cap)) for _ in range(reps)
    ]
    f0 = floods[0]
    res.add(
        "flood.rapidlimit.ns_per_hit",
        f"flood {nflood:,} random keys, cap {cap:,}: ns per hit (incl. key)",
        "ns/hit",
        [f["ns_per_hit"] for f in floods],
    )
    res.add(
        "flood.rapidlimit.rss_growth",
        "flood, cap 10,000: RSS growth",
        "MiB",
        [f["rss_growth"] / 2**20 for f in floods],
    )
    res.add(
        "flood.rapidlimit.memory_bytes",
        "flood, cap 10,000: memory_bytes() after",
        "KiB",
        [f["memory_bytes"] / 1024 for f in floods],
    )
    res.log(
        f"flood: rapidlimit holds {f0['keys']:,} keys (max_keys={f0['max_keys']:,}); "
        f"hot key (10/minute) allowed {f0['hot_allowed']} of {f0['hot_hits']} hits "
        "(10 = the cap never made it forget the hot key)"
    )
    if f0["keys"] > 1.1 * cap:
        res.log(f"NOTE: {f0['keys']:,} keys held with max_keys={cap:,}: cap exceeded")
    if not cfg.quick:
        lf = _worker("flood", "limits", str(nflood), str(cap))
        res.add(
            "flood.limits.rss_growth",
            "flood, limits (no key cap): RSS growth",
            "MiB",
            [lf["rss_growth"] / 2**20],
        )
        res.add(
            "flood.limits.ns_per_hit",
            "flood, limits: ns per hit",
            "ns/hit",
            [lf["ns_per_hit"]],
        )
        res.log(f"flood: limits holds {lf['keys']:,} keys (it has no cap)")


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    if mode == "keys":
        result = worker_keys(rest[0], rest[1], int(rest[2]))
    elif mode == "flood":
        result = worker_flood(rest[0], int(rest[1]), int(rest[2]))
    else:
        raise SystemExit(f"unknown worker mode {mode!r}")
    print(json.dumps(result))
