"""Instructions a redis-server spends per decision, under callgrind.

Used by section 6 (bench_callgrind.py) and by hand:
``python benchmarks/redis_callgrind.py [--calls N] [--keep DIR]`` prints the
figures of every strategy. A redis-server (from PATH, or $REDIS_SERVER: a
build with symbols lets callgrind_annotate name functions in the dumps kept
under --keep) runs under ``valgrind --tool=callgrind`` on 127.0.0.1 at a
free port. Its counters are zeroed before and dumped after each measured
loop (callgrind_control), so start-up and warm-up are left out; the whole
server counts (reading the command, the script, the reply), not only
EVALSHA. Measured on 1,000 keys holding live state:

- rapidlimit's decisions through its own client, lone (one request, one
  limit, a blocking caller: the call the script's lone-request block
  answers) and shared (64 decisions awaited together on an event loop);
- ``limits``' fixed-window hit through redis-py (its Lua increment), the
  call slowapi makes per limit with headers off;
- the floor of any script call: the EVALSHA of a script that returns at
  once, with one key and an 88-byte argument as rapidlimit's lone call.

Instruction counts do not move with the machine's noise, unlike INFO
commandstats' microseconds: the figures to compare two versions of the
script by.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from common import NOP_SCRIPT, BrokenBenchmark, RedisServer, Skip, callgrind_total

STRATEGIES = ("fixed-window", "token-bucket", "sliding-window-counter", "moving-window")
LIMIT = "100000000/day"
# The moving window's log holds at most 2**20 entries (and keeps one per hit).
MOVING_LIMIT = "1000/day"
KEYS = [f"client-{i}" for i in range(1000)]
SHARED = 64  # decisions awaited together
# The argument of rapidlimit's lone call, which the empty script's call
# (one key) is given too.
LONE_ARGUMENT = bytes(88)


class CountingServer:
    """A redis-server under callgrind whose instructions are counted per
    operation: ``with CountingServer() as cs: cs.per_op(run)``."""

    def __init__(self, exe: str | None = None, keep: str | None = None) -> None:
        self.exe = exe or os.environ.get("REDIS_SERVER")
        self.keep = keep
        self.out = Path()
        self.rs: RedisServer | None = None

    def __enter__(self) -> CountingServer:
        if shutil.which("valgrind") is None:
            raise Skip("valgrind not installed (scripts/install-deps.sh --bench)")
        self.out = Path(self.keep or tempfile.mkdtemp(prefix="redis-callgrind-"))
        self.out.mkdir(parents=True, exist_ok=True)
        self.rs = RedisServer(
            wrapper=[
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={self.out}/cg.out",
            ],
            exe=self.exe,
            wait=60,  # valgrind's start-up
        )
        try:
            self.rs.__enter__()
        except BaseException:
            self._clean()
            raise
        return self

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.rs is not None:
            self.rs.__exit__(t, e, tb)
        self._clean()

    def _clean(self) -> None:
        if not self.keep:
            shutil.rmtree(self.out, ignore_errors=True)

    @property
    def uri(self) -> str:
        """The server's plain URI (redis-py, limits)."""
        assert self.rs is not None
        return self.rs.uri

    @property
    def rapid_uri(self) -> str:
        """rapidlimit's URI: valgrind slows the server fifty times, and the
        0.2 s default timeout would fail decisions; fail-closed, so that a
        decision Redis did not make raises instead of passing for a hit."""
        return f"{self.uri}?timeout=30&connect_timeout=30&on_error=fail-closed"

    def client(self) -> Any:
        assert self.rs is not None
        return self.rs.client()

    def flush(self) -> None:
        """Empties the server's keys."""
        r = self.client()
        try:
            r.flushall()
        finally:
            r.close()

    def _control(self, flag: str) -> None:
        assert self.rs is not None and self.rs.proc is not None
        subprocess.run(
            ["callgrind_control", flag, str(self.rs.proc.pid)],
            check=True,
            capture_output=True,
        )

    def per_op(self, what: str, run: Callable[[], int]) -> float:
        """The server's instructions per operation while ``run`` runs (it
        returns how many operations it made)."""
        self._control("-z")
        ops = run()
        before = set(self.out.iterdir())
        self._control("-d")
        for _ in range(300):  # the server's own thread writes it
            new = [f for f in set(self.out.iterdir()) - before if f.stat().st_size]
            if new:
                time.sleep(0.2)  # written whole
                total = callgrind_total(new[0], what)
                if not self.keep:
                    new[0].unlink()
                return total / ops
            time.sleep(0.1)
        raise BrokenBenchmark(f"{what}: callgrind wrote no dump in {self.out}")


def rapidlimit_decisions(cs: CountingServer, strategy: str, n: int) -> dict[str, float]:
    """Instructions per decision of ``strategy``: {"lone": ..., "shared": ...}."""
    import rapidlimit
    import rapidlimit.storage

    storage = rapidlimit.storage.storage_from_string(cs.rapid_uri)
    loop = asyncio.new_event_loop()
    item = rapidlimit.parse(MOVING_LIMIT if strategy == "moving-window" else LIMIT)

    def allowed(decisions: Any, what: str) -> None:
        for d in decisions:  # a refusal would be another path than a hit
            if not d.allowed:
                raise BrokenBenchmark(f"{what}: {strategy} refused a decision")

    def lone() -> int:
        for i in range(n):
            allowed(
                storage.decide_many(strategy, [(item, KEYS[i % len(KEYS)], 1)]), "lone"
            )
        return n

    async def together() -> int:
        done = 0
        for i in range(0, n, SHARED):
            replies = await asyncio.gather(
                *(
                    storage.decide_many_async(
                        strategy, [(item, KEYS[(i + j) % len(KEYS)], 1)]
                    )
                    for j in range(SHARED)
                )
            )
            for r in replies:
                allowed(r, "shared")
            done += SHARED
        return done

    try:
        # The same state for every repetition: a moving window's log grows
        # with each hit, and its cost with it.
        cs.flush()
        for key in KEYS:  # live state on every key
            storage.decide_many(strategy, [(item, key, 1)])
        return {
            "lone": cs.per_op(f"{strategy} lone", lone),
            "shared": cs.per_op(
                f"{strategy} shared", lambda: loop.run_until_complete(together())
            ),
        }
    finally:
        loop.close()
        storage.close()


def limits_hits(cs: CountingServer, n: int, stats: bool = False) -> float:
    """Instructions per fixed-window hit of ``limits`` through redis-py; with
    ``stats`` also per ``get_window_stats`` after it, as slowapi asks for
    each limit when it sends headers."""
    import limits
    import limits.storage

    storage = limits.storage.storage_from_string(cs.uri)
    limiter = limits.strategies.FixedWindowRateLimiter(storage)
    item = limits.parse(LIMIT)

    def run() -> int:
        for i in range(n):
            key = KEYS[i % len(KEYS)]
            if not limiter.hit(item, key):
                raise BrokenBenchmark("limits refused a fixed-window hit")
            if stats and limiter.get_window_stats(item, key).remaining <= 0:
                raise BrokenBenchmark("limits: no hit left after a hit")
        return n

    cs.flush()
    for key in KEYS:
        limiter.hit(item, key)
    return cs.per_op("limits fixed-window", run)


def empty_script(cs: CountingServer, n: int) -> float:
    """Instructions per EVALSHA of a script that returns at once."""
    r = cs.client()
    sha = r.script_load(NOP_SCRIPT)
    keys = [f"floor:{{{k}}}" for k in KEYS]

    def run() -> int:
        for i in range(n):
            r.evalsha(sha, 1, keys[i % len(keys)], LONE_ARGUMENT)
        return n

    run()  # warm
    try:
        return cs.per_op("empty script", run)
    finally:
        r.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--keep", help="a directory to keep the callgrind dumps in")
    a = p.parse_args()
    n = a.calls
    try:
        with CountingServer(keep=a.keep) as cs:
            print(
                f"redis-server under callgrind, {n} decisions per figure, limit "
                f"{LIMIT} ({MOVING_LIMIT} for the moving window)"
            )
            print("instructions per decision:")
            print(f"{'':28} {'lone call':>12} {SHARED:>3} shared")
            for strategy in STRATEGIES:
                f = rapidlimit_decisions(cs, strategy, n)
                print(
                    f"{strategy:28} {f['lone']:12,.0f} {f['shared']:12,.0f}", flush=True
                )
            print(f"{'limits fixed-window':28} {limits_hits(cs, n):12,.0f}")
            print(
                f"{'  + get_window_stats':28} {limits_hits(cs, n, stats=True):12,.0f}"
            )
            print(f"{'empty script (EVALSHA)':28} {empty_script(cs, n):12,.0f}")
    except Skip as e:
        raise SystemExit(str(e)) from None
    if a.keep:
        print(f"dumps in {a.keep}", file=sys.stderr)


if __name__ == "__main__":
    main()
