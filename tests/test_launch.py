"""`fastprune.app.launch`: the process supervisor behind `fastprune prune --nproc N` (plain
Python children, no torch: fast)."""

from __future__ import annotations

import json
import sys
import time

import pytest

from fastprune.app.launch import PEER_FAILED_EXIT, free_port, launch


def _script(body: str) -> list[str]:
    return [
        sys.executable,
        "-c",
        "import os, sys, time, json\nr = int(os.environ['RANK'])\n" + body,
    ]


def test_every_rank_gets_the_environment(tmp_path):
    body = f"json.dump(dict(os.environ), open(r'{tmp_path}/env%d.json' % r, 'w'))"
    assert launch(3, _script(body)) == (0, None)
    envs = [json.loads((tmp_path / f"env{r}.json").read_text()) for r in range(3)]
    for r, e in enumerate(envs):
        assert e["RANK"] == e["LOCAL_RANK"] == str(r)
        assert e["WORLD_SIZE"] == e["LOCAL_WORLD_SIZE"] == "3"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["FASTPRUNE_LAUNCHED"] == "1"
        assert e["MASTER_PORT"] == envs[0]["MASTER_PORT"] and int(e["MASTER_PORT"]) > 0
        assert int(e["OMP_NUM_THREADS"]) >= 1


def test_a_failing_rank_terminates_the_others():
    t0 = time.monotonic()
    status, msg = launch(2, _script("sys.exit(5) if r == 1 else time.sleep(120)"), grace_s=0.5)
    assert time.monotonic() - t0 < 30
    assert status == 5
    assert msg == "rank 1 of 2 failed (exit status 5); terminated rank 0"


def test_the_rank_that_failed_first_on_its_own_is_named():
    # rank 0 stops at once because "another rank failed"; rank 1's own failure comes later
    body = f"sys.exit({PEER_FAILED_EXIT}) if r == 0 else (time.sleep(0.5), sys.exit(7))"
    status, msg = launch(2, _script(body))
    assert status == 7
    assert msg == "rank 1 of 2 failed (exit status 7); rank 0 stopped too"


def test_a_killed_rank():
    body = "import signal; os.kill(os.getpid(), signal.SIGKILL) if r == 0 else time.sleep(120)"
    status, msg = launch(2, _script(body), grace_s=0.2)
    assert status == 1 and msg.startswith("rank 0 of 2 failed (killed by SIGKILL)")


@pytest.mark.parametrize("bad", [0, -1, 1.5, "2", True])
def test_nproc_checked(bad):
    with pytest.raises(ValueError, match="^nproc must be an integer >= 1"):
        launch(bad, [sys.executable, "-c", "pass"])


def test_free_port():
    assert 0 < free_port() < 65536
