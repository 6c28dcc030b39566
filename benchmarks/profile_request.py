"""Profiles one app variant through the raw ASGI driver: the profile behind
a target that is not met.

    python benchmarks/profile_request.py --package rapidlimit --headers 1
    python benchmarks/profile_request.py --package slowapi --path middleware
    python benchmarks/profile_request.py --package rapidlimit --callgrind

Default: cProfile of n requests, top functions by own time, restricted to
the limiter's package when --only-package is given. With --callgrind it runs
itself under ``valgrind --tool=callgrind`` (instrumenting the n requests
only) and prints callgrind_annotate's inclusive top (C and C++ frames,
including the core's); divide by n for per-request figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from apps import PATHS, Driver, Variant, make_app, prime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--package", default="rapidlimit", choices=("none", "slowapi", "rapidlimit")
    )
    p.add_argument("--path", default="decorator", choices=PATHS)
    p.add_argument("--headers", type=int, default=1)
    p.add_argument("--traffic", default="allowed", choices=("allowed", "rejected"))
    p.add_argument("-n", type=int, default=5000)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--sort", default="tottime", help="pstats sort key")
    p.add_argument("--only-package", action="store_true")
    p.add_argument("--callgrind", action="store_true")
    p.add_argument("--no-profile", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.callgrind:
        return callgrind(a)
    v = Variant(a.package, a.path, bool(a.headers), a.traffic)
    loop = asyncio.new_event_loop()
    d = Driver(make_app(v))
    prime(loop, v, d)
    loop.run_until_complete(d.run(200))
    if a.no_profile:  # the body run under callgrind
        from bench_callgrind import _Toggle

        toggle = _Toggle()
        coro = d.run(a.n)
        toggle.start()
        loop.run_until_complete(coro)
        toggle.stop()
        return None
    d.statuses.clear()
    prof = cProfile.Profile()
    coro = d.run(a.n)
    prof.enable()
    loop.run_until_complete(coro)
    prof.disable()
    print(f"{v}: {a.n} requests, statuses {dict(d.statuses)}")
    stats = pstats.Stats(prof)
    if a.only_package and a.package != "none":
        # Full paths, filtered on the package directories (slowapi's
        # counting happens in limits).
        pattern = "/(slowapi|limits)/" if a.package == "slowapi" else "rapidlimit"
        stats.sort_stats(a.sort).print_stats(pattern, a.top)
    else:
        stats.strip_dirs().sort_stats(a.sort).print_stats(a.top)
    return None


def callgrind(a: argparse.Namespace) -> None:
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed")
    from bench_callgrind import _build_toggle

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        toggle = _build_toggle(Path(tmp))  # instrument the requests only
        env = dict(os.environ, PYTHONHASHSEED="0")
        if toggle:
            env["RL_CG_TOGGLE"] = toggle
        args = [
            f"--package={a.package}",
            f"--path={a.path}",
            f"--headers={a.headers}",
            f"--traffic={a.traffic}",
            "-n",
            str(a.n),
            "--no-profile",
        ]
        subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                *(["--instr-atstart=no"] if toggle else []),
                sys.executable,
                __file__,
                *args,
            ],
            check=True,
            env=env,
        )
        subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)], check=False)


if __name__ == "__main__":
    main()
