"""`fastprune prune --nproc N`: start N local processes with torchrun's environment and watch
them (no torch import here).

Each process gets RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a
free MASTER_PORT, plus `FASTPRUNE_LAUNCHED=1` so that it prunes instead of launching again,
and OMP_NUM_THREADS = cores / N unless set. The parent waits; when a process fails it gives
the others `grace_s` seconds to stop on their own (a rank that stops because another failed
exits with `PEER_FAILED_EXIT`), then terminates the rest, and reports the rank that failed
first on its own.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

LAUNCHED_ENV = "FASTPRUNE_LAUNCHED"
PEER_FAILED_EXIT = 3
"""Exit status of a rank that stopped because another rank failed (`RankFailedError`)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launched() -> bool:
    """True inside a process started by `launch`."""
    return os.environ.get(LAUNCHED_ENV) == "1"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _stop(procs: list[subprocess.Popen], wait_s: float = 5.0) -> None:
    """Terminate every process still running (SIGTERM, then SIGKILL after `wait_s`)."""
    alive = [p for p in procs if p.poll() is None]
    for p in alive:
        p.terminate()
    deadline = time.monotonic() + wait_s
    for p in alive:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(
    nproc: int,
    command: list[str],
    env: dict[str, str] | None = None,
    grace_s: float = 5.0,
    poll_s: float = 0.05,
) -> tuple[int, str | None]:
    """Run `command` as ranks 0..nproc-1 of one process group on this machine.

    Returns `(0, None)` when every rank exits 0, else `(status, message)`: the exit status
    of the rank that failed first on its own (1 if it was killed by a signal) and a message
    naming it and the ranks that were stopped."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be an integer >= 1, got {nproc!r}")
    base = dict(os.environ if env is None else env)
    base.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        **{LAUNCHED_ENV: "1"},
    )
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs: list[subprocess.Popen] = []
    try:
        for r in range(nproc):
            procs.append(subprocess.Popen(command, env=dict(base, RANK=str(r), LOCAL_RANK=str(r))))
        return _supervise(procs, grace_s, poll_s)
    finally:
        _stop(procs)


def _supervise(procs: list[subprocess.Popen], grace_s: float, poll_s: float):
    while True:
        codes = [p.poll() for p in procs]
        if all(c == 0 for c in codes):
            return 0, None
        if any(c not in (None, 0) for c in codes):
            break
        time.sleep(poll_s)
    # one failed: the others hear of it at their next sync point and stop on their own
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(poll_s)
    codes = [p.poll() for p in procs]
    stopped = [r for r, c in enumerate(codes) if c is None]
    _stop(procs)
    failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
    first = [r for r in failed if codes[r] != PEER_FAILED_EXIT] or failed
    r = first[0]
    msg = f"rank {r} of {len(procs)} failed ({_describe(codes[r])})"
    also = [k for k in failed if k != r]
    if also:
        msg += f"; rank{'s' if len(also) > 1 else ''} {', '.join(map(str, also))} stopped too"
    if stopped:
        msg += f"; terminated rank{'s' if len(stopped) > 1 else ''} {', '.join(map(str, stopped))}"
    status = codes[r] if codes[r] > 0 else 1
    return status, msg


def prune_command(argv: list[str]) -> list[str]:
    """The command each rank of `fastprune prune --nproc N` runs: this interpreter on
    `python -m fastprune` with the same arguments."""
    return [sys.executable, "-m", "fastprune", *argv]
