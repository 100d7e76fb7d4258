"""The crash points' knob (coordinator/failpoints.py), in real child processes: the armed hit dies by
SIGKILL and nothing after it runs; unarmed, nothing happens; a misspelt point or count is refused
at import, since a crash test whose point never fires would pass without testing anything."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest

from coordinator.failpoints import ENV, FailpointSpecError, parse
from sparecycles.cli.processes import child_env

SCRIPT = """
from coordinator import failpoints
for i in range(1, 4):
    failpoints.hit("checkpoint.after_save")
    failpoints.hit("ledger.after_commit", lambda: False)  # never counts
    print("passed", i, flush=True)
"""


def run(spec: str | None) -> subprocess.CompletedProcess[str]:
    env = child_env({ENV: spec} if spec is not None else {})
    if spec is None:
        env.pop(ENV, None)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_the_armed_hit_kills_the_process_before_anything_after_it_runs() -> None:
    died = run("checkpoint.after_save:2")
    assert died.returncode == -signal.SIGKILL
    assert died.stdout.split("\n")[:-1] == ["passed 1"]
    assert "failpoint checkpoint.after_save hit 2: SIGKILL" in died.stderr


def test_unarmed_points_and_passes_that_do_not_count_do_nothing() -> None:
    for spec in (None, "", "ledger.after_commit:1", "checkpoint.after_save:4"):
        ran = run(spec)
        assert ran.returncode == 0 and ran.stdout.split("\n")[:-1] == ["passed 1", "passed 2", "passed 3"], spec


def test_a_misspelt_point_or_count_is_refused_with_how_to_write_it() -> None:
    refused = run("ledger.after_insrt:2")
    assert refused.returncode == 1 and "unknown failpoint 'ledger.after_insrt'; known: " in refused.stderr
    with pytest.raises(FailpointSpecError, match=re.escape("a whole number from 1, e.g. ledger.after_insert:3")):
        parse("ledger.after_insert:0")
    with pytest.raises(FailpointSpecError, match="whole number"):
        parse("ledger.after_insert:x")
    assert parse(" ledger.after_insert:3, checkpoint.before_save ") == {"ledger.after_insert": 3,
                                                                        "checkpoint.before_save": 1}
