"""2. In-process request cost: the FastAPI app called as an ASGI callable.

No sockets and no HTTP parsing: a raw driver calls ``app(scope, receive,
send)`` in a loop on one event loop. For every variant (package x path x
headers x traffic) the figure is the time per request; "added" is that minus
the no-limiter app's time in the same repetition.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from apps import PATHS, Driver, Variant, check_statuses, make_app, prime
from common import Config, SectionResult, rapidlimit_web_available

TITLE = "2. In-process request cost (raw ASGI driver, memory storage)"


def variants(cfg: Config, packages: list[str]) -> list[Variant]:
    out = [Variant("none")]
    for pkg in packages:
        for path in PATHS:
            for headers in (False, True):
                for traffic in ("allowed", "rejected"):
                    out.append(Variant(pkg, path, headers, traffic))
    return out


def label(v: Variant) -> str:
    if v.package == "none":
        return "no limiter"
    hdr = "headers on" if v.headers else "headers off"
    return f"{v.package:<10} {v.path:<15} {hdr:<11} {v.traffic}"


def key(v: Variant) -> str:
    if v.package == "none":
        return "none"
    return f"{v.package}.{v.path}.{'headers' if v.headers else 'noheaders'}.{v.traffic}"


def run(cfg: Config, res: SectionResult) -> None:
    # Many short pairs rather than a few long ones: a garbage collection of
    # the oldest generation or a stolen time slice lands in a few pairs,
    # which the median leaves out, instead of in every long batch.
    n = cfg.pick(100, 200)
    reps = cfg.pick(6, 41)
    clock: Callable[[], int] = cfg.ns
    packages = ["slowapi"]
    why = rapidlimit_web_available()
    if why:
        res.skip(f"rapidlimit variants: {why}")
    else:
        packages.append("rapidlimit")

    loop = asyncio.new_event_loop()
    try:
        drivers: dict[str, tuple[Variant, Driver]] = {}
        for v in variants(cfg, packages):
            d = Driver(make_app(v))
            prime(loop, v, d)
            drivers[key(v)] = (v, d)

        def once(k: str) -> float:
            v, d = drivers[k]
            d.statuses.clear()
            coro = d.run(n)
            start = clock()
            loop.run_until_complete(coro)
            elapsed = clock() - start
            check_statuses(label(v), d.statuses, v.expected_status, n, d)
            return elapsed / n / 1000.0

        # Every variant is paired with a no-limiter batch run just before it,
        # and "added" is the difference within the pair; the order of the
        # variants rotates from one repetition to the next.
        names = [k for k in drivers if k != "none"]
        samples: dict[str, list[float]] = {k: [] for k in drivers}
        added: dict[str, list[float]] = {k: [] for k in names}
        for rep in range(reps):
            shift = rep % len(names)
            for k in names[shift:] + names[:shift]:
                base = once("none")
                t = once(k)
                samples["none"].append(base)
                samples[k].append(t)
                added[k].append(t - base)
    finally:
        loop.close()

    res.add("none", "no limiter: µs per request", "µs", samples["none"])
    for k in names:
        v = drivers[k][0]
        res.add(
            f"{k}.added",
            f"{label(v)}: added",
            "µs",
            added[k],
            note="negative: cheaper than the no-limiter request (endpoint skipped)",
        )
    # slowapi / rapidlimit ratio of the total time, same repetition.
    if "rapidlimit" in packages:
        for path in PATHS:
            for hdr in ("noheaders", "headers"):
                for traffic in ("allowed", "rejected"):
                    s = samples[f"slowapi.{path}.{hdr}.{traffic}"]
                    r = samples[f"rapidlimit.{path}.{hdr}.{traffic}"]
                    res.ratio(
                        f"speedup.{path}.{hdr}.{traffic}",
                        f"time per request slowapi/rapidlimit {path} {hdr} {traffic}",
                        s,
                        r,
                        better="higher",
                    )
        for path in PATHS:
            for hdr in ("noheaders", "headers"):
                a = samples[f"rapidlimit.{path}.{hdr}.allowed"]
                r = samples[f"rapidlimit.{path}.{hdr}.rejected"]
                res.ratio(
                    f"reject_over_allowed.rapidlimit.{path}.{hdr}",
                    f"rapidlimit {path} {hdr}: rejected/allowed time",
                    r,
                    a,
                    better="lower",
                )
    res.log(
        f"{n} requests per batch, {reps} repetitions, each variant paired with a "
        f"no-limiter batch; {cfg.clock} clock; event loop: asyncio"
    )
