"""4. Redis: round trips, Redis CPU, decisions/s under concurrency, latency.

A throwaway redis-server on 127.0.0.1 (free port, no persistence) pinned to
CPU 0; this process moves itself to the last CPU for the section.

* Latency of one fixed-window hit (``limits`` + redis-py/hiredis against
  rapidlimit), sequential, next to a bare PING (raw socket and redis-py)
  measured in the same repetition, and to the raw-socket EVALSHA of an empty
  script and of a GET + SET script: the floor of any decision a Lua script
  makes, against the PING.
* Per request through the app (decorator, in-process driver, one request at
  a time): round trips (Redis ``total_reads_processed``: one read event per
  request/response exchange), commands executed (INFO commandstats, commands
  run inside scripts included) and Redis CPU (``used_cpu_user + used_cpu_sys``,
  and the commandstats ``usec``).
* Redis time per decision of rapidlimit's script (commandstats ``usec`` of
  EVALSHA, which includes the commands the script runs), fixed window and
  token bucket, one decision at a time and 64 concurrent, next to the floor
  of any script on the same server and on keys like the decisions' (as
  many, with a TTL, in the same order): an EVALSHA that only returns, one
  that runs a GET and a SET, and one that does no more than an exact
  fixed-window hit must (redis-py, sequential and pipelined). One at a
  time, the decision runs behind the event loop (the figure the target
  reads) and from a blocking caller, whose cadence is the floors'.
* Decisions/s at 1, 16 and 64 concurrent requests on one event loop: at
  the limiter (rapidlimit's awaitable decision against the blocking
  ``limits`` call slowapi makes), through the whole app, and from threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from apps import Driver, Variant, check_statuses, close_rapidlimit, make_app, prime
from common import (
    NOP_SCRIPT,
    RAPID_REDIS_OPTIONS,
    BrokenBenchmark,
    Config,
    RedisServer,
    SectionResult,
    cpu_count,
    interleaved,
    rapidlimit_redis_available,
    rapidlimit_web_available,
)

TITLE = "4. Redis (local redis-server, loopback)"
KEYS = [f"client-{i}" for i in range(1000)]
LIMIT = "100000000/day"


@contextlib.contextmanager
def own_cpu() -> Iterator[None]:
    """Moves this process off CPU 0 (where redis-server runs) for a while."""
    if cpu_count() < 2:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(old)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


class RawPing:
    """PING over a plain socket: the floor of one loopback round trip."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        # Blocking again, bounded by the kernel instead: Python's own timeout
        # polls before every recv, a system call more inside the PING
        # measured. A Redis that stops answering fails the run in 10 s
        # (EAGAIN) rather than hanging it.
        self.sock.settimeout(None)
        limit = struct.pack("ll", 10, 0)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def ping(self) -> None:
        self.sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        if self.sock.recv(64) != b"+PONG\r\n":
            raise BrokenBenchmark("raw PING: unexpected reply")

    def close(self) -> None:
        self.sock.close()


class RawScript(RawPing):
    """EVALSHA of a script that returns 0, over a plain socket: what any
    decision made by a Lua script costs beyond a PING (the script's run,
    without Python or the client's work)."""

    def __init__(self, port: int, sha: str, key: str) -> None:
        super().__init__(port)
        parts = [b"EVALSHA", sha.encode(), b"1", key.encode()]
        self.cmd = f"*{len(parts)}\r\n".encode() + b"".join(
            b"$%d\r\n%s\r\n" % (len(p), p) for p in parts
        )

    def call(self) -> None:
        self.sock.sendall(self.cmd)
        if self.sock.recv(64) != b":0\r\n":
            raise BrokenBenchmark("raw EVALSHA: unexpected reply")


def _per_op(fn: Callable[[], Any], n: int) -> Callable[[], float]:
    def once() -> float:
        start = time.perf_counter_ns()
        for _ in range(n):
            fn()
        return (time.perf_counter_ns() - start) / n / 1000.0

    return once


def _per_hit(limiter: Any, item: Any, n: int) -> Callable[[], float]:
    def once() -> float:
        hit = limiter.hit
        keys = KEYS
        start = time.perf_counter_ns()
        for i in range(n):
            hit(item, keys[i % 1000])
        elapsed = time.perf_counter_ns() - start
        if not hit(item, keys[0]):
            raise BrokenBenchmark(f"{type(limiter).__module__}: hit rejected")
        return elapsed / n / 1000.0

    return once


def latency(cfg: Config, res: SectionResult, rs: RedisServer, rapid: bool) -> None:
    import limits
    import limits.storage
    import limits.strategies

    n = cfg.pick(200, 3000)
    reps = cfg.pick(3, 7)
    raw = RawPing(rs.port)
    client = rs.client()
    lim = limits.strategies.FixedWindowRateLimiter(
        limits.storage.storage_from_string(rs.uri)
    )
    nop = RawScript(rs.port, client.script_load(NOP_SCRIPT), "floor")
    get_set = RawScript(rs.port, client.script_load(_GET_SET), "floor")
    variants: dict[str, Callable[[], float]] = {
        "ping_raw": _per_op(raw.ping, n),
        "ping_redispy": _per_op(client.ping, n),
        "nop_raw": _per_op(nop.call, n),
        "get_set_raw": _per_op(get_set.call, n),
        "limits": _per_hit(lim, limits.parse(LIMIT), n),
    }
    if rapid:
        import rapidlimit
        import rapidlimit.storage
        import rapidlimit.strategies

        rstorage = rapidlimit.storage.storage_from_string(rs.rapid_uri)
        rlim = rapidlimit.strategies.FixedWindowRateLimiter(rstorage)
        variants["rapidlimit"] = _per_hit(rlim, rapidlimit.parse(LIMIT), n)
        if callable(getattr(rstorage, "ping", None)):
            variants["ping_rapidlimit"] = _per_op(rstorage.ping, n)
        # The same decision awaited on an event loop, one at a time: the
        # loop sends it and reads the reply itself (the connection is idle).
        loop = asyncio.new_event_loop()
        ritem = rapidlimit.parse(LIMIT)

        async def awaited() -> None:
            decide = rstorage.decide_many_async
            for _ in range(n):
                await decide("fixed-window", [(ritem, "x", 1)])

        def awaited_once() -> float:
            start = time.perf_counter_ns()
            loop.run_until_complete(awaited())
            return (time.perf_counter_ns() - start) / n / 1000.0

        variants["rapidlimit_awaited"] = awaited_once
    for fn in variants.values():  # warm-up: connections, script loading
        fn()
    samples = interleaved(variants, reps)
    if rapid:
        loop.close()
        rstorage.close()
    for conn in (raw, nop, get_set):
        conn.close()
    res.add("latency.ping_raw", "bare PING, raw socket", "µs", samples["ping_raw"])
    for name, what in (("nop", "an empty script"), ("get_set", "a GET + SET script")):
        res.ratio(
            f"latency.{name}_over_ping",
            f"EVALSHA of {what}, raw socket / raw PING (floor of any script)",
            samples[f"{name}_raw"],
            samples["ping_raw"],
            better="lower",
        )
    res.add(
        "latency.ping_redispy", "bare PING, redis-py", "µs", samples["ping_redispy"]
    )
    res.add("latency.limits", "limits fixed-window hit", "µs", samples["limits"])
    res.ratio(
        "latency.limits_over_ping",
        "limits hit / raw PING",
        samples["limits"],
        samples["ping_raw"],
        better="lower",
    )
    if rapid:
        res.add(
            "latency.rapidlimit",
            "rapidlimit fixed-window hit",
            "µs",
            samples["rapidlimit"],
        )
        res.ratio(
            "latency.rapidlimit_over_ping",
            "rapidlimit hit / raw PING",
            samples["rapidlimit"],
            samples["ping_raw"],
            better="lower",
        )
        res.ratio(
            "latency.rapidlimit_awaited_over_ping",
            "rapidlimit decision awaited on an event loop / raw PING",
            samples["rapidlimit_awaited"],
            samples["ping_raw"],
            better="lower",
        )
        res.ratio(
            "latency.speedup",
            "limits hit / rapidlimit hit",
            samples["limits"],
            samples["rapidlimit"],
            better="higher",
        )


# An unchanged slowapi app whose storage_uri names rapidlimit's scheme
# (limits talks to the native store through rapidlimit.contrib.limits).
SLOWAPI_ON_RAPIDLIMIT = "slowapi+rl"


def _app_variant(pkg: str, rs: RedisServer, **kw: Any) -> Variant:
    """The decorator variant of ``pkg`` (a package, or SLOWAPI_ON_RAPIDLIMIT)
    on ``rs``."""
    if pkg == SLOWAPI_ON_RAPIDLIMIT:
        import rapidlimit.contrib.limits  # noqa: F401  (registers the schemes)

        return Variant(
            "slowapi", "decorator", storage_uri=f"rapidlimit+{rs.rapid_uri}", **kw
        )
    return Variant(pkg, "decorator", storage_uri=rs.uri_for(pkg), **kw)


def _redis_counters(client: Any) -> tuple[int, float, dict[str, dict[str, float]]]:
    stats = client.info("stats")
    cpu = client.info("cpu")
    cmds = client.info("commandstats")
    used = float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])
    return int(stats["total_reads_processed"]), used, cmds


def per_request(
    cfg: Config, res: SectionResult, rs: RedisServer, packages: list[str]
) -> None:
    n = cfg.pick(150, 2000)
    reps = cfg.pick(2, 5)
    client = rs.client()
    loop = asyncio.new_event_loop()
    # slowapi reads a limit's window for its headers right after each hit:
    # what the moving and sliding windows cost there too, on limits'
    # redis:// and on rapidlimit's scheme.
    cases = [(pkg, "fixed-window", h) for pkg in packages for h in (False, True)]
    cases += [
        (pkg, strategy, True)
        for pkg in packages
        if pkg in ("slowapi", SLOWAPI_ON_RAPIDLIMIT)
        for strategy in ("moving-window", "sliding-window-counter")
    ]
    try:
        for pkg, strategy, headers in cases:
            fixed = strategy == "fixed-window"
            subject = pkg if fixed else f"{pkg}.{strategy}"
            for traffic in ("allowed", "rejected"):
                v = _app_variant(
                    pkg,
                    rs,
                    headers=headers,
                    traffic=traffic,
                    key_prefix=f"rt-{subject}-{headers}-{traffic}",
                    strategy=strategy,
                )
                d = Driver(make_app(v))
                prime(loop, v, d)
                trips, cpu_us, cmd_us, ncmds = [], [], [], []
                breakdown: dict[str, float] = {}
                for _ in range(reps):
                    client.config_resetstat()
                    reads0, cpu0, _ = _redis_counters(client)
                    d.statuses.clear()
                    loop.run_until_complete(d.run(n))
                    reads1, cpu1, cmds = _redis_counters(client)
                    check_statuses(f"{v}", d.statuses, v.expected_status, n, d)
                    # Each INFO round (3 commands on our own connection)
                    # is 3 reads; the first round's reads are counted
                    # after its snapshot except for its first command.
                    trips.append((reads1 - reads0 - 3) / n)
                    cpu_us.append((cpu1 - cpu0) * 1e6 / n)
                    own = {"info", "config", "config|resetstat"}
                    mine = {
                        name.removeprefix("cmdstat_"): st
                        for name, st in cmds.items()
                        if name.removeprefix("cmdstat_") not in own
                    }
                    cmd_us.append(sum(float(s["usec"]) for s in mine.values()) / n)
                    ncmds.append(sum(float(s["calls"]) for s in mine.values()) / n)
                    breakdown = {k: float(s["calls"]) / n for k, s in mine.items()}
                hdr = "headers" if headers else "noheaders"
                k = f"{subject}.{hdr}.{traffic}"
                on_off = "headers on" if headers else "headers off"
                lbl = f"{pkg:<10} {on_off:<11} {traffic}"
                if not fixed:
                    lbl += f", {strategy}"
                res.add(
                    f"round_trips.{k}",
                    f"{lbl}: round trips/request",
                    "trips",
                    trips,
                )
                res.add(
                    f"commands.{k}", f"{lbl}: Redis commands/request", "cmds", ncmds
                )
                res.add(f"redis_cpu.{k}", f"{lbl}: Redis CPU/request", "µs", cpu_us)
                res.add(
                    f"redis_cmd_usec.{k}",
                    f"{lbl}: Redis command time/request",
                    "µs",
                    cmd_us,
                )
                pretty = ", ".join(f"{c} {x:.2f}" for c, x in sorted(breakdown.items()))
                res.log(f"{lbl}: commands per request: {pretty or 'none'}")
                d.close()
    finally:
        loop.close()


def concurrency(
    cfg: Config, res: SectionResult, rs: RedisServer, packages: list[str]
) -> None:
    n = cfg.pick(256, 4000)
    reps = cfg.pick(2, 5)
    levels = (1, 16, 64)
    loop = asyncio.new_event_loop()
    try:
        drivers: dict[str, tuple[Variant, Driver]] = {}
        for pkg in packages:
            v = _app_variant(
                pkg, rs, headers=False, traffic="allowed", key_prefix=f"cc-{pkg}"
            )
            d = Driver(make_app(v))
            prime(loop, v, d)
            drivers[pkg] = (v, d)

        def sampler(pkg: str, c: int) -> Callable[[], float]:
            v, d = drivers[pkg]

            def once() -> float:
                d.statuses.clear()
                coro = d.run(n, c)
                start = time.perf_counter_ns()
                loop.run_until_complete(coro)
                elapsed = time.perf_counter_ns() - start
                check_statuses(f"{v} x{c}", d.statuses, v.expected_status, n, d)
                return n / (elapsed / 1e9)

            return once

        variants = {f"{pkg}.c{c}": sampler(pkg, c) for pkg in packages for c in levels}
        samples = interleaved(variants, reps)
    finally:
        for _, d in drivers.values():
            d.close()
        loop.close()
    for c in levels:
        for pkg in packages:
            res.add(
                f"requests.{pkg}.c{c}",
                f"app, {pkg:<10} {c:>2} concurrent requests",
                "req/s",
                samples[f"{pkg}.c{c}"],
                better="higher",
            )
        if "rapidlimit" in packages:
            res.ratio(
                f"requests.speedup.c{c}",
                f"app, rapidlimit/slowapi req/s at {c} concurrent",
                samples[f"rapidlimit.c{c}"],
                samples[f"slowapi.c{c}"],
                better="higher",
            )
        if SLOWAPI_ON_RAPIDLIMIT in packages:
            res.ratio(
                f"requests.adapter_speedup.c{c}",
                f"app, slowapi on rapidlimit+redis/on redis req/s at {c} concurrent",
                samples[f"{SLOWAPI_ON_RAPIDLIMIT}.c{c}"],
                samples[f"slowapi.c{c}"],
                better="higher",
            )
    res.log(
        f"app req/s: {n} requests per sample through the app (decorator, "
        "headers off, allowed), in process, asyncio"
    )


async def _in_flight(one: Callable[[str], Awaitable[bool]], c: int, per: int) -> int:
    """C tasks on the running loop, each deciding ``per`` keys of KEYS in
    turn through ``one``; returns how many decisions allowed."""

    async def worker(idx: int) -> int:
        ok = 0
        for i in range(per):
            ok += await one(KEYS[(idx * 7 + i) % 1000])
        return ok

    return sum(await asyncio.gather(*(worker(i) for i in range(c))))


def _in_flight_samples(
    loop: asyncio.AbstractEventLoop,
    deciders: dict[str, Callable[[str], Awaitable[bool]]],
    levels: tuple[int, ...],
    n: int,
    reps: int,
    label: str = "",
) -> dict[str, list[float]]:
    """Decisions/s of each decider with C in flight on ``loop``, by
    "<name>.c<C>" for every level, interleaved after a warm-up (connections,
    scripts); a rejected decision is a broken benchmark."""

    def sampler(lib: str, c: int) -> Callable[[], float]:
        one = deciders[lib]

        def once() -> float:
            per = n // c
            coro = _in_flight(one, c, per)
            start = time.perf_counter_ns()
            allowed = loop.run_until_complete(coro)
            elapsed = time.perf_counter_ns() - start
            if allowed != per * c:
                raise BrokenBenchmark(
                    f"{label}{lib} x{c}: {per * c - allowed} rejected"
                )
            return per * c / (elapsed / 1e9)

        return once

    for lib in deciders:
        sampler(lib, 1)()
    return interleaved(
        {f"{lib}.c{c}": sampler(lib, c) for lib in deciders for c in levels},
        reps,
    )


# The floor of one script that reads and writes one key (NOP_SCRIPT is that
# of any script): a value as long as a fixed window's state, its TTL kept.
_GET_SET = (
    "local v = redis.call('GET', KEYS[1]) "
    "redis.call('SET', KEYS[1], 'abcdefghijklmnopqrstuvwx', 'KEEPTTL') return 0"
)

# The least an exact fixed-window decision can ask of Redis: read the state
# (count, expiry as seconds and nanoseconds), compare, rewrite the count in
# place. ARGV[1]: pack("<dddd", now_s, now_ns, cost, amount). Answers the
# state read, as rapidlimit's script does; 0 when there was no live window
# (a broken floor).
_MIN_FIXED_WINDOW = """
local now_s, now_ns, cost, amount = struct.unpack('<dddd', ARGV[1])
local key = KEYS[1]
local v = redis.call('GET', key)
if v and #v == 24 then
  local c, xs, xn = struct.unpack('<ddd', v)
  if xs > now_s or (xs == now_s and xn > now_ns) then
    c = c + cost
    redis.call('SETRANGE', key, '0', struct.pack('<d', c))
    if c <= amount then return v end
  end
end
return 0
"""

_SCRIPT_CMDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def _script_usec(client: Any) -> tuple[float, float]:
    """(calls, usec) of script commands since the last CONFIG RESETSTAT;
    a script's usec includes the commands it runs."""
    calls = usec = 0.0
    for name, st in client.info("commandstats").items():
        if name.removeprefix("cmdstat_") in _SCRIPT_CMDS:
            calls += float(st["calls"])
            usec += float(st["usec"])
    return calls, usec


def script_cost(cfg: Config, res: SectionResult, rs: RedisServer, rapid: bool) -> None:
    """Redis time per decision of rapidlimit's script against the floor of
    any Lua script on this server. Issue target: <= 5 µs per decision for
    fixed window and token bucket."""
    n = cfg.pick(400, 4000)
    reps = cfg.pick(2, 9)  # one sample takes a third of a second; the VM jitters
    client = rs.client()
    # The floors run on keys like the decisions' (as many, as long, with a
    # TTL, visited in the same order): Redis finds a key it has not touched
    # for a while in a colder cache, and a key with a TTL in two tables.
    # Each floor has keys of its own, holding a live fixed window's state.
    now = int(time.time())
    state = struct.pack("<ddd", 0, now + 86_400, 0)
    arg = struct.pack("<dddd", now, 0, 1, 1e15)  # never over the limit
    floors = {  # name: (sha, args after the key)
        "nop": (client.script_load(NOP_SCRIPT), ()),
        "get_set": (client.script_load(_GET_SET), ()),
        "min_fixed_window": (client.script_load(_MIN_FIXED_WINDOW), (arg,)),
    }
    floor_labels = {
        "nop": "empty script (EVALSHA return 0)",
        "get_set": "script with one GET and one SET",
        "min_fixed_window": "script doing no more than a fixed-window hit must "
        "(GET, compare, SETRANGE of the count)",
    }
    floor_keys = {
        name: [f"rapidlimit:f{i}:{{{k}}}{k}" for k in KEYS]
        for i, name in enumerate(floors)
    }
    pipe = client.pipeline(transaction=False)
    for keys in floor_keys.values():
        for k in keys:
            pipe.set(k, state, px=86_400_000)
    pipe.execute()
    sha, extra = floors["min_fixed_window"]
    if client.evalsha(sha, 1, floor_keys["min_fixed_window"][0], *extra) != state:
        raise BrokenBenchmark("the minimal fixed-window script found no window")

    def floor(name: str, pipelined: bool) -> Callable[[], float]:
        sha, extra = floors[name]
        keys = floor_keys[name]

        def once() -> float:
            client.config_resetstat()
            if pipelined:
                # As _in_flight's 64 workers: worker w's i-th key.
                for i in range(n // 64):
                    pipe = client.pipeline(transaction=False)
                    for w in range(64):
                        pipe.evalsha(sha, 1, keys[(w * 7 + i) % len(keys)], *extra)
                    pipe.execute()
            else:
                for i in range(n // 64 * 64):
                    client.evalsha(sha, 1, keys[i % len(keys)], *extra)
            calls, usec = _script_usec(client)
            return usec / calls

        return once

    variants: dict[str, Callable[[], float]] = {
        f"floor.{name}.{mode}": floor(name, mode == "c64")
        for name in floors
        for mode in ("c1", "c64")
    }
    loop = asyncio.new_event_loop()
    per_call: dict[str, float] = {}
    if rapid:
        import rapidlimit
        import rapidlimit.storage

        storage = rapidlimit.storage.storage_from_string(rs.rapid_uri)
        item = rapidlimit.parse(LIMIT)

        def rapid_cost(strategy: str, c: int) -> Callable[[], float]:
            async def one(key: str) -> bool:
                got = await storage.decide_many_async(strategy, [(item, key, 1)])
                return bool(got[-1].allowed)

            def once() -> float:
                client.config_resetstat()
                decided = n // c * c
                allowed = loop.run_until_complete(_in_flight(one, c, n // c))
                if allowed != decided:
                    raise BrokenBenchmark(
                        f"{strategy} x{c}: {decided - allowed} rejected"
                    )
                calls, usec = _script_usec(client)
                # Requests waiting together share a script call.
                if not 0 < calls <= decided or (c == 1 and calls != decided):
                    raise BrokenBenchmark(
                        f"{strategy} x{c}: {calls:.0f} script calls for "
                        f"{decided} decisions"
                    )
                per_call[f"{strategy}.c{c}"] = decided / calls
                return usec / decided

            return once

        def rapid_sync_cost(strategy: str) -> Callable[[], float]:
            """One at a time from a blocking caller (a sync endpoint's
            thread), which writes and reads the socket itself: Redis waits
            less between two calls than behind the event loop's round trip."""

            def once() -> float:
                client.config_resetstat()
                decided = n // 64 * 64
                allowed = sum(
                    bool(
                        storage.decide_many(strategy, [(item, KEYS[i % 1000], 1)])[
                            -1
                        ].allowed
                    )
                    for i in range(decided)
                )
                calls, usec = _script_usec(client)
                if allowed != decided or calls != decided:
                    raise BrokenBenchmark(
                        f"{strategy} sync: {allowed} allowed, {calls:.0f} script "
                        f"calls for {decided} decisions"
                    )
                return usec / decided

            return once

        for strategy in ("fixed-window", "token-bucket"):
            for c in (1, 64):
                variants[f"rapidlimit.{strategy}.c{c}"] = rapid_cost(strategy, c)
            variants[f"rapidlimit.{strategy}.c1sync"] = rapid_sync_cost(strategy)
    try:
        for fn in variants.values():
            fn()  # warm-up: scripts loaded, keys created
        samples = interleaved(variants, reps)
    finally:
        loop.close()
        if rapid:
            storage.close()
    for c, how in (("c1", "one at a time"), ("c64", "64 in flight")):
        for name, what in floor_labels.items():
            res.add(
                f"script_usec.floor.{name}.{c}",
                f"{what}, {how}",
                "µs",
                samples[f"floor.{name}.{c}"],
            )
        if rapid:
            for strategy in ("fixed-window", "token-bucket"):
                res.add(
                    f"script_usec.rapidlimit.{strategy}.{c}",
                    f"rapidlimit {strategy} decision script, {how}",
                    "µs",
                    samples[f"rapidlimit.{strategy}.{c}"],
                )
    if rapid:
        for strategy in ("fixed-window", "token-bucket"):
            res.add(
                f"script_usec.rapidlimit.{strategy}.c1sync",
                f"rapidlimit {strategy} decision script, one at a time from a "
                "blocking caller (the floors' cadence)",
                "µs",
                samples[f"rapidlimit.{strategy}.c1sync"],
            )
    res.log(
        "script time: INFO commandstats usec of EVALSHA per decision (the "
        "commands a script runs are inside its time; the per-command rows of "
        "the request figures above count them a second time)"
    )
    if per_call:
        res.log(
            "rapidlimit decisions per script call (last sample): "
            + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per_call.items()))
        )


def decisions(cfg: Config, res: SectionResult, rs: RedisServer, rapid: bool) -> None:
    """Decisions/s with C requests in flight on one event loop, at the
    limiter: rapidlimit's awaitable ``decide_many_async`` against the
    decision slowapi makes (``limits``' fixed-window ``hit`` on its Redis
    storage, a blocking call in the event loop, as slowapi calls it; slowapi's
    own overhead is left out, which flatters it)."""
    import limits
    import limits.storage
    import limits.strategies

    n = cfg.pick(384, 6000)
    reps = cfg.pick(2, 5)
    levels = (1, 16, 64)
    lim = limits.strategies.FixedWindowRateLimiter(
        limits.storage.storage_from_string(rs.uri)
    )
    litem = limits.parse(LIMIT)

    async def slowapi_one(key: str) -> bool:
        return bool(lim.hit(litem, key))

    deciders: dict[str, Callable[[str], Awaitable[bool]]] = {"slowapi": slowapi_one}
    storage: Any = None
    if rapid:
        import rapidlimit
        import rapidlimit.storage

        storage = rapidlimit.storage.storage_from_string(rs.rapid_uri)
        ritem = rapidlimit.parse(LIMIT)
        if callable(getattr(storage, "decide_many_async", None)):

            async def rapid_one(key: str) -> bool:
                got = await storage.decide_many_async("fixed-window", [(ritem, key, 1)])
                return bool(got[-1].allowed)

            deciders["rapidlimit"] = rapid_one
        else:
            res.skip("rapidlimit decisions/s: RedisStorage has no decide_many_async")
    loop = asyncio.new_event_loop()
    try:
        samples = _in_flight_samples(loop, deciders, levels, n, reps)
    finally:
        loop.close()
        close_rapidlimit(storage)
    for c in levels:
        for lib in deciders:
            what = "decide_many_async" if lib == "rapidlimit" else "limits hit"
            res.add(
                f"decisions.{lib}.c{c}",
                f"{lib:<10} ({what}) {c:>2} concurrent",
                "dec/s",
                samples[f"{lib}.c{c}"],
                better="higher",
            )
        if "rapidlimit" in deciders:
            res.ratio(
                f"decisions.speedup.c{c}",
                f"decisions/s rapidlimit/slowapi at {c} concurrent",
                samples[f"rapidlimit.c{c}"],
                samples[f"slowapi.c{c}"],
                better="higher",
            )


def aio_adapter(cfg: Config, res: SectionResult, rs: RedisServer, rapid: bool) -> None:
    """Hits/s of limits.aio's fixed window with C tasks in flight on one
    event loop, for an application written against limits.aio that only
    changes its storage URI: ``async+rapidlimit+redis://`` against limits'
    own ``async+redis://`` (coredis, its default) and the same with
    ``implementation="redispy"``."""
    import limits
    import limits.aio.strategies
    import limits.storage

    n = cfg.pick(384, 6000)
    reps = cfg.pick(2, 5)
    levels = (1, 64)
    item = limits.parse(LIMIT)
    uris: dict[str, tuple[str, dict[str, str]]] = {
        "coredis": (f"async+{rs.uri}", {}),
        "redispy": (f"async+{rs.uri}", {"implementation": "redispy"}),
    }
    if rapid:
        import rapidlimit.contrib.limits  # noqa: F401  (registers the schemes)

        uris["rapidlimit"] = (f"async+rapidlimit+{rs.rapid_uri}", {})
    loop = asyncio.new_event_loop()
    hitters: dict[str, Callable[[str], Awaitable[bool]]] = {}
    made_storages: list[Any] = []

    async def made(uri: str, options: dict[str, str]) -> Any:
        # coredis binds its connections to the loop that makes the storage.
        return limits.aio.strategies.FixedWindowRateLimiter(
            limits.storage.storage_from_string(uri, **options)
        )

    for lib, (uri, options) in uris.items():
        try:
            limiter = loop.run_until_complete(made(uri, options))
        except (ImportError, limits.errors.ConfigurationError) as e:
            res.skip(f"limits.aio adapter, {lib}: {e}")
            continue

        async def one(key: str, limiter: Any = limiter) -> bool:
            return bool(await limiter.hit(item, key))

        hitters[lib] = one
        made_storages.append(limiter.storage)

    try:
        samples = _in_flight_samples(loop, hitters, levels, n, reps, "aio ")
    finally:
        loop.close()
        for storage in made_storages:
            close_rapidlimit(storage)
    for c in levels:
        for lib in hitters:
            res.add(
                f"aio.{lib}.c{c}",
                f"limits.aio fixed-window hit, {lib:<10} {c:>2} concurrent",
                "hits/s",
                samples[f"{lib}.c{c}"],
                better="higher",
            )
        for other in ("coredis", "redispy"):
            if "rapidlimit" in hitters and other in hitters:
                res.ratio(
                    f"aio.speedup.{other}.c{c}",
                    f"limits.aio hits/s async+rapidlimit+redis/{other} at {c}",
                    samples[f"rapidlimit.c{c}"],
                    samples[f"{other}.c{c}"],
                    better="higher",
                )


def threads(cfg: Config, res: SectionResult, rs: RedisServer, rapid: bool) -> None:
    """Decisions/s of the strategies API called from C Python threads at
    once (rapidlimit waits with the GIL released; redis-py uses a pool)."""
    import threading

    import limits
    import limits.storage
    import limits.strategies

    n = cfg.pick(600, 4000)
    reps = cfg.pick(2, 3)
    levels = (1, 16, 64)
    libs: dict[str, tuple[Any, Any]] = {
        "limits": (
            limits.strategies.FixedWindowRateLimiter(
                limits.storage.storage_from_string(rs.uri)
            ),
            limits.parse(LIMIT),
        )
    }
    if rapid:
        import rapidlimit
        import rapidlimit.storage
        import rapidlimit.strategies

        libs["rapidlimit"] = (
            rapidlimit.strategies.FixedWindowRateLimiter(
                rapidlimit.storage.storage_from_string(rs.rapid_uri)
            ),
            rapidlimit.parse(LIMIT),
        )

    def sampler(lib: str, c: int) -> Callable[[], float]:
        limiter, item = libs[lib]

        def once() -> float:
            failures: list[BaseException] = []
            barrier = threading.Barrier(c + 1)

            def work(idx: int) -> None:
                try:
                    barrier.wait()
                    hit = limiter.hit
                    for i in range(n // c):
                        if not hit(item, KEYS[(idx * 7 + i) % 1000]):
                            raise BrokenBenchmark(f"{lib}: hit rejected")
                except BaseException as exc:  # reported below
                    failures.append(exc)

            ts = [threading.Thread(target=work, args=(i,)) for i in range(c)]
            for t in ts:
                t.start()
            barrier.wait()
            start = time.perf_counter_ns()
            for t in ts:
                t.join()
            elapsed = time.perf_counter_ns() - start
            if failures:
                raise BrokenBenchmark(f"{lib} x{c} threads: {failures[0]!r}")
            return (n // c) * c / (elapsed / 1e9)

        return once

    for fn in (sampler(lib, 1) for lib in libs):
        fn()  # warm-up
    try:
        samples = interleaved(
            {f"{lib}.t{c}": sampler(lib, c) for lib in libs for c in levels}, reps
        )
    finally:
        for limiter, _ in libs.values():
            close_rapidlimit(limiter.storage)
    for c in levels:
        for lib in libs:
            res.add(
                f"threads.{lib}.t{c}",
                f"{lib:<10} hit() from {c:>2} threads",
                "hits/s",
                samples[f"{lib}.t{c}"],
                better="higher",
            )
        if rapid:
            res.ratio(
                f"threads.speedup.t{c}",
                f"rapidlimit/limits hits/s, {c} threads",
                samples[f"rapidlimit.t{c}"],
                samples[f"limits.t{c}"],
                better="higher",
            )


def run(cfg: Config, res: SectionResult) -> None:
    with RedisServer(cpu=0 if cpu_count() >= 2 else None) as rs, own_cpu():
        why = rapidlimit_redis_available(rs.rapid_uri)
        rapid = not why
        if why:
            res.skip(f"rapidlimit Redis: {why}")
        web = rapidlimit_web_available()
        packages = ["slowapi"]
        if rapid:
            packages.append(SLOWAPI_ON_RAPIDLIMIT)
        if rapid and not web:
            packages.append("rapidlimit")
        elif web:
            res.skip(f"rapidlimit request-level Redis figures: {web}")
        latency(cfg, res, rs, rapid)
        per_request(cfg, res, rs, packages)
        script_cost(cfg, res, rs, rapid)
        decisions(cfg, res, rs, rapid)
        aio_adapter(cfg, res, rs, rapid)
        concurrency(cfg, res, rs, packages)
        if not cfg.quick:
            threads(cfg, res, rs, rapid)
        info = rs.client().info("server")
        res.log(
            f"rapidlimit's Redis URI options: {RAPID_REDIS_OPTIONS} (the 0.2 s "
            "default timeout rejects fail-closed on a slow reply; redis-py has none)"
        )
        res.log(
            f"redis-server {info.get('redis_version')} on 127.0.0.1:{rs.port}; "
            "client: redis-py "
            f"{__import__('redis').__version__} (hiredis parser if installed)"
        )
