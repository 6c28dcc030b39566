"""Instructions a redis-server spends per rapidlimit decision, by hand.

``python benchmarks/redis_callgrind.py [--calls N]`` starts redis-server
(from PATH, or $REDIS_SERVER: a build with symbols lets callgrind_annotate
name functions in the dumps kept under --keep) under ``valgrind
--tool=callgrind`` on 127.0.0.1 at a free port, and for each strategy
counts the server's instructions per decision, through rapidlimit's own
client: lone calls (one request, one limit, a blocking caller: the call the
script's lone-request block answers) on 1,000 keys holding live state, and
shared calls (64 decisions awaited together on an event loop). Counters are
zeroed before and dumped after each measured loop (callgrind_control), so
start-up and warm-up are left out; the whole server counts (reading the
command, the script, the reply), not only EVALSHA. Instruction counts do
not move with the machine's noise, unlike INFO commandstats' microseconds:
the figure to compare two versions of the script by.
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
from pathlib import Path
from typing import Any

from bench_callgrind import callgrind_total
from common import RedisServer, Skip

STRATEGIES = ("fixed-window", "token-bucket", "sliding-window-counter", "moving-window")
LIMIT = "100000000/day"
# The moving window's log holds at most 2**20 entries (and keeps one per hit).
MOVING_LIMIT = "1000/day"
KEYS = [f"client-{i}" for i in range(1000)]


def _zero(rs: RedisServer) -> None:
    """Starts counting afresh."""
    assert rs.proc is not None
    subprocess.run(
        ["callgrind_control", "-z", str(rs.proc.pid)], check=True, capture_output=True
    )


def _dump(rs: RedisServer, out: Path, what: str) -> int:
    """The instructions counted since the last zero, dumped to a new file
    (cg.out.1, cg.out.2 ... as callgrind numbers its dumps)."""
    assert rs.proc is not None
    before = set(out.iterdir())
    subprocess.run(
        ["callgrind_control", "-d", str(rs.proc.pid)], check=True, capture_output=True
    )
    for _ in range(300):  # the server's own thread writes it
        new = [f for f in set(out.iterdir()) - before if f.stat().st_size > 0]
        if new:
            time.sleep(0.2)  # written whole
            return callgrind_total(new[0], what)
        time.sleep(0.1)
    raise SystemExit(f"callgrind wrote no dump in {out}")


def measure(rs: RedisServer, out: Path, n: int) -> None:
    """Prints the instructions per decision of every strategy."""
    import rapidlimit
    import rapidlimit.storage

    # Valgrind slows the server fifty times: rapidlimit's 0.2 s default
    # timeout would fail decisions.
    storage = rapidlimit.storage.storage_from_string(
        f"{rs.uri}?timeout=30&connect_timeout=30"
    )
    loop = asyncio.new_event_loop()
    print(
        f"redis-server under callgrind, {n} decisions per figure, limit "
        f"{LIMIT} ({MOVING_LIMIT} for the moving window)"
    )
    print("instructions per decision:")
    print(f"{'strategy':24} {'lone call':>12} {'64 shared':>12}")
    try:
        for strategy in STRATEGIES:
            item = rapidlimit.parse(
                MOVING_LIMIT if strategy == "moving-window" else LIMIT
            )
            for key in KEYS:  # live state on every key
                storage.decide_many(strategy, [(item, key, 1)])
            _zero(rs)
            for i in range(n):
                storage.decide_many(strategy, [(item, KEYS[i % len(KEYS)], 1)])
            lone = _dump(rs, out, strategy) / n

            async def shared(strategy: str = strategy, item: Any = item) -> None:
                for i in range(0, n, 64):
                    await asyncio.gather(
                        *(
                            storage.decide_many_async(
                                strategy, [(item, KEYS[(i + j) % len(KEYS)], 1)]
                            )
                            for j in range(64)
                        )
                    )

            _zero(rs)
            loop.run_until_complete(shared())
            batch = _dump(rs, out, strategy) / (-(-n // 64) * 64)
            print(f"{strategy:24} {lone:12,.0f} {batch:12,.0f}", flush=True)
    finally:
        loop.close()
        storage.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=1000)
    p.add_argument("--keep", help="a directory to keep the callgrind dumps in")
    a = p.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found (scripts/install-deps.sh --bench)")
    out = Path(a.keep or tempfile.mkdtemp(prefix="redis-callgrind-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RedisServer(
            wrapper=[
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}/cg.out",
            ],
            exe=os.environ.get("REDIS_SERVER"),
            wait=60,  # valgrind's start-up
        ) as rs:
            measure(rs, out, a.calls)
    except Skip as e:  # no redis-server
        raise SystemExit(str(e)) from None
    if a.keep:
        print(f"dumps in {out}", file=sys.stderr)
    else:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
