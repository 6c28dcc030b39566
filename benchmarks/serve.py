"""Runs one benchmark app variant under uvicorn (one worker): bench_http.py
starts it pinned to a CPU and loads it with wrk.

    python benchmarks/serve.py --port 8000 --package rapidlimit --headers 1
"""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

import uvicorn

from apps import Variant, make_app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--package", default="none")
    p.add_argument("--path", default="decorator")
    p.add_argument("--headers", type=int, default=0)
    p.add_argument("--traffic", default="allowed")
    p.add_argument("--storage-uri", default="memory://")
    p.add_argument("--endpoint", default="async")
    p.add_argument("--key-prefix", default="")
    p.add_argument(
        "--http",
        default="h11",
        choices=("h11", "httptools"),
        help="uvicorn's HTTP protocol (the suite's figures: h11)",
    )
    p.add_argument("--awaits", type=int, default=0)
    p.add_argument("--awaits-redis", type=int, default=0)
    p.add_argument("--strategy", default="fixed-window")
    p.add_argument(
        "--gc-stats",
        default="",
        help="a file path: count CPython's garbage collections and their time "
        "by generation, and write them there as JSON on SIGHUP (bench_http's "
        "GC figures)",
    )
    p.add_argument(
        "--gc-freeze",
        type=int,
        default=0,
        help="1: gc.freeze() once the app is built (not used by the suite; "
        "for comparing the latency tail by hand, see README)",
    )
    a = p.parse_args()
    v = Variant(
        package=a.package,
        path=a.path,
        headers=bool(a.headers),
        traffic=a.traffic,
        storage_uri=a.storage_uri,
        endpoint=a.endpoint,
        key_prefix=a.key_prefix,
        http=a.http,
        awaits=bool(a.awaits),
        awaits_redis=bool(a.awaits_redis),
        strategy=a.strategy,
    )
    toggle = os.environ.get("RL_CG_TOGGLE")
    if toggle:
        # Under callgrind (bench_callgrind.py's http subjects): SIGUSR1 and
        # SIGUSR2 switch the instrumentation on and off around the load, so
        # start-up and shutdown are not counted.
        import ctypes

        lib = ctypes.CDLL(toggle)

        def on(*_: Any) -> None:
            lib.rl_cg_start()

        def off(*_: Any) -> None:
            lib.rl_cg_stop()

        signal.signal(signal.SIGUSR1, on)
        signal.signal(signal.SIGUSR2, off)
    if a.gc_stats:
        _count_collections(a.gc_stats)
    app = make_app(v)
    if a.gc_freeze:
        import gc

        gc.collect()
        gc.freeze()
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=a.port,
        workers=1,
        log_level="warning",
        # Named, not "auto": installing uvicorn[standard] (uvloop, httptools)
        # must not change the server of earlier runs under the same figures.
        http=a.http,
        loop="asyncio",
        access_log=False,
    )


def _count_collections(path: str) -> None:
    """Totals per generation since start-up: collections and seconds spent.
    SIGHUP writes them to ``path`` (whole, through a rename), so the reader
    takes the difference across a load."""
    import gc
    import json
    import time

    count = [0, 0, 0]
    seconds = [0.0, 0.0, 0.0]
    began = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            gen = info["generation"]
            count[gen] += 1
            seconds[gen] += time.perf_counter() - began[0]

    def dump(*_: Any) -> None:
        with open(path + ".tmp", "w") as f:
            json.dump({"collections": count, "seconds": seconds}, f)
        os.replace(path + ".tmp", path)

    gc.callbacks.append(timed)
    signal.signal(signal.SIGHUP, dump)


if __name__ == "__main__":
    main()
