import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import warnings
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from quickstart import app


def test_quickstart() -> None:
    client = TestClient(app)
    codes = [client.get("/home").status_code for _ in range(6)]
    assert codes == [200] * 5 + [429]
    rejected = client.get("/home")
    assert rejected.json() == {"error": "Rate limit exceeded: 5 per 1 minute"}
    assert rejected.headers["x-ratelimit-limit"] == "5"
    ok = client.get("/mars")
    assert ok.json() == {"key": "value"}
    assert ok.headers["x-ratelimit-remaining"] == "4"


def test_quickstart_serves_as_the_readme_runs_it() -> None:
    # `python3 examples/quickstart.py --serve`: the script's folder comes
    # first on sys.path, so no example may shadow a library uvicorn imports
    # (an examples/websockets package once did).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    here = Path(__file__).parent
    args = [sys.executable, str(here / "quickstart.py"), "--serve", "--port", str(port)]
    # Dies with the test process, even when that one is killed.
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        args = [setpriv, "--pdeathsig", "TERM", *args]
    proc = subprocess.Popen(
        args,
        cwd=here.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                # A timeout: a server that accepted and hung must fail this
                # test, not hold it.
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/home", timeout=10
                ) as r:
                    assert r.status == 200
                    assert r.headers["x-ratelimit-limit"] == "5"
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:  # never left running
            proc.kill()
            proc.wait()


def test_quickstart_demo_as_the_readme_runs_it() -> None:
    # `python3 examples/quickstart.py`: five 200s, then 429s, without the
    # warning Starlette 1.x's TestClient printed (its httpx backend is
    # deprecated).
    script = Path(__file__).parent / "quickstart.py"
    r = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    lines = [line.split() for line in r.stdout.splitlines()]
    codes = [words[2] for words in lines if words and words[0] == "request"]
    assert codes == ["200"] * 5 + ["429"] * 2
    assert "Traceback" not in r.stderr and "TestClient" not in r.stderr, r.stderr
