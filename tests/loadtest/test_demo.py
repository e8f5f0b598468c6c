"""`make run`'s path, end to end: services, worker, demo stream, alerts shown, clean stop."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness.services import Services
from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def test_demo_shows_alerts_and_stops(svc: Services, redis_prefix: str) -> None:
    svc.create_topics(redis_prefix)
    env = {
        **os.environ,
        "TRACEWATCH_DEMO_EXIT": "1",
        "KAFKA_BOOTSTRAP": svc.kafka_bootstrap,
        "REDIS_URL": svc.redis_url,
        "TRACEWATCH_TOPIC_PREFIX": redis_prefix,
    }
    result = subprocess.run(
        [sys.executable, "-m", "cli", "demo", "--events", "600"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    out = result.stdout
    assert "Prometheus metrics at http://127.0.0.1:" in out
    assert "NO_CODE" in out and "alerts total:" in out
    # part of the stream went through POST /v1/events, and the broker confirmed it
    api_line = next(ln for ln in out.splitlines() if ln.startswith("through the HTTP API:"))
    assert int(api_line.split("(")[1].split(" accepted")[0].split()[-1]) > 0, api_line
    total = int(out.split("alerts total:")[1].split()[0])
    assert total > 0
    if "no PostgreSQL here" not in out:  # the sink filled the case list the API serves
        cases = int(out.split("  cases: ")[1].split()[0])
        assert 0 < cases <= total, out[-1500:]
        assert "/v1/cases" in out
    assert out.rstrip().endswith("stopped")


@pytest.mark.parametrize(
    ("whom", "sig", "after"),
    [
        ("group", signal.SIGINT, "running;"),
        ("process", signal.SIGTERM, "running;"),
        ("process", signal.SIGTERM, "worker up;"),  # mid-way: the API starting, nothing sent
    ],
    ids=["ctrl-c", "sigterm", "sigterm-early"],
)
def test_a_stop_signal_ends_the_demo_and_everything_it_started(
    whom: str, sig: signal.Signals, after: str
) -> None:
    """`make run` then Ctrl-C: the terminal signals the whole process group at once - demo,
    worker, API, broker host, Redis. `timeout`, `docker stop` or systemd with one main process
    send SIGTERM to the demo alone. Either way everything must be gone within seconds, exit 0,
    the worker must not be left talking to a broker that went first, and nothing may linger -
    processes or the demo's temporary folder."""
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "REDIS_URL")}
    temporary = Path(tempfile.gettempdir())
    folders_before = set(temporary.glob("tracewatch-demo-*"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli", "demo", "--events", "300"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as under a terminal
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith(after):
                break
        assert lines and lines[-1].startswith(after), "".join(lines)[-2000:]
        started = time.monotonic()
        if whom == "group":
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        rest, errors = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, errors[-2000:]
    assert took < 20, f"stopping took {took:.0f} s"
    assert rest.rstrip().endswith("stopped")
    assert "Connection refused" not in errors, errors[-2000:]
    left = set(temporary.glob("tracewatch-demo-*")) - folders_before
    assert not left, f"{left} left behind"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the broker host and Redis exit after the demo
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        pytest.fail("processes of the demo's group are still running after Ctrl-C")


def _read_until(fd: int, wanted: bytes, timeout: float) -> bytes:
    """What the terminal shows until `wanted` appears (or EOF, or `timeout`)."""
    seen = b""
    deadline = time.monotonic() + timeout
    while wanted not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: every process on the terminal has gone
                break
            if not chunk:
                break
            seen += chunk
    return seen


def test_ctrl_c_on_make_run_in_a_terminal_exits_0() -> None:
    """`make run` in a terminal, then Ctrl-C typed: make must exit 0 (the demo takes the
    terminal's foreground, so make is not interrupted and does not report "*** Interrupt")."""
    env = {k: v for k, v in os.environ.items() if k not in ("KAFKA_BOOTSTRAP", "REDIS_URL")}
    env.pop("MAKEFLAGS", None)
    env.pop("MAKELEVEL", None)
    pid, fd = pty.fork()
    if pid == 0:  # the child: session leader on the new terminal, as a login shell would be
        try:
            os.chdir(ROOT)
            os.execvpe("make", ["make", "-s", "run", "EVENTS=300"], env)
        finally:
            os._exit(127)
    try:
        shown = _read_until(fd, b"running;", timeout=240)
        assert b"running;" in shown, shown[-3000:].decode(errors="replace")
        os.write(fd, b"\x03")  # Ctrl-C, as typed
        shown += _read_until(fd, b"\x00never", timeout=30)
        _, status = os.waitpid(pid, 0)
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = shown.decode(errors="replace")
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, (status, text[-2000:])
    assert "Interrupt" not in text, text[-2000:]
    assert text.rstrip().endswith("stopped"), text[-2000:]
