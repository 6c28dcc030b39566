"""6. Instructions per hit under ``valgrind --tool=callgrind``.

Instruction counts barely move on a noisy machine: this is the figure to
watch for regressions. Each subject runs twice under callgrind, with n1 and
n2 operations after the same setup and warm-up; (Ir(n2) - Ir(n1)) / (n2 - n1)
is the cost of one operation with interpreter start-up, imports and set-up
cancelled out. When a C compiler is at hand, a tiny helper (callgrind.h
client requests, loaded with ctypes) switches instrumentation on only around
the measured loop (``--instr-atstart=no``), which makes each run several
times faster; the figures are the same. PYTHONHASHSEED is fixed so that runs
are repeatable.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common import HERE, BrokenBenchmark, Config, SectionResult, Skip

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
}
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

        v = Variant(rest, "decorator", headers=rest != "none")
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

# "totals:" is the sum over the run; "summary:" can be 0 when the
# instrumentation starts late, so it is only the fallback.
_TOTALS = re.compile(r"^totals:\s+(\d+)", re.M)
_SUMMARY = re.compile(r"^summary:\s+(\d+)", re.M)


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
    text = out.read_text()
    m = _TOTALS.search(text) or _SUMMARY.search(text)
    if not m:
        raise BrokenBenchmark(f"callgrind {subject}: no totals in {out}")
    return int(m.group(1))


def run(cfg: Config, res: SectionResult) -> None:
    if shutil.which("valgrind") is None:
        msg = "valgrind not installed (scripts/install-deps.sh --bench)"
        if cfg.quick:
            raise Skip(msg)
        raise BrokenBenchmark(msg)
    reps = cfg.pick(1, 3)
    subjects = [s for s, (_, _, q) in SUBJECTS.items() if q or not cfg.quick]
    per_op: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="rl-callgrind-") as tmpdir:
        tmp = Path(tmpdir)
        toggle = _build_toggle(tmp)
        for subject in subjects:
            n1, n2, _ = SUBJECTS[subject]
            samples = []
            for _ in range(reps):
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
            unit = "Ir/req" if subject.startswith("asgi.") else "Ir/hit"
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
    for pkg in ("rapidlimit", "slowapi"):
        if f"asgi.{pkg}" in per_op and "asgi.none" in per_op:
            res.add(
                f"asgi.{pkg}.added",
                f"asgi.{pkg} (decorator, headers on): added over no limiter",
                "Ir/req",
                [a - b for a, b in zip(per_op[f"asgi.{pkg}"], per_op["asgi.none"])],
            )
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


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _worker(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit("usage: bench_callgrind.py worker SUBJECT N")
