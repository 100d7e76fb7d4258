"""What the node daemon costs its volunteer and how fast it gets out of the way, in one run.

    python benchmarks/bench_node.py [--seconds 60] [--spikes 10] [--tasks 24]

Uses the Mosquitto on 127.0.0.1:1883 and starts its own coordinator (temporary SQLite, one replica
a task, the node's owner trusted so nothing is audited) and node daemons, then prints side by side:
(a) an idle daemon (connected, no work, idle-only on as shipped): CPU % of one core and RSS of its
    whole process tree (children included) over `--seconds` (goals <= 0.5 % and <= 80 MB);
(b) load spike to suspension: a CPU hog (one spinning process per core) starts, and the time until
    the daemon's status file says "suspended"; median and worst of `--spikes` (goal <= 1 s);
(c) throughput of one slot on the same job with --cpu-cap-percent 100 and 50: tasks/s and ratio.
Stops exactly the processes it started, by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sparecycles.cli.processes import ManagedProcess, ProcessGroup, free_port  # noqa: E402
from tests.integration.cpu_load import CpuHog, poll_status, spinner  # noqa: E402
from tests.integration.network import submitter  # noqa: E402

BROKER = "mqtt://127.0.0.1:1883"
ROWS_PER_TASK = 384


def tree_usage(root: psutil.Process) -> tuple[float, int]:
    """CPU seconds (reaped children included) and resident bytes of `root` and its descendants."""
    cpu, rss = 0.0, 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            cpu += t.user + t.system + t.children_user + t.children_system
            rss += proc.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return cpu, rss


def start_coordinator(group: ProcessGroup, tmp: Path) -> str:
    port = free_port()
    group.start("coordinator", ["--broker", BROKER, "--db", f"sqlite:///{tmp / 'coordinator.db'}",
                                "--http", f"127.0.0.1:{port}", "--replicas", "1", "--trusted-owner", "bench"],
                ready=r"coordinator ready", timeout=60, name="coordinator")
    return f"http://127.0.0.1:{port}"


def start_node(group: ProcessGroup, tmp: Path, url: str, name: str, *extra: str) -> tuple[ManagedProcess, Path]:
    key = tmp / name / "node.key"
    args = ["--broker", BROKER, "--coordinator", url, "--key", str(key), "--owner", "bench",
            "--owner-key", str(tmp / "owner-bench.key"), "--slots", "1", "--cache-dir", str(tmp / name / "cache")]
    proc = group.start("node", [*args, *extra], ready=r"node ready", timeout=60, name=name)
    return proc, key


def idle_daemon(group: ProcessGroup, tmp: Path, url: str, seconds: float) -> tuple[float, float, float]:
    """(CPU % of one core, mean RSS MB, peak RSS MB) of an idle daemon's tree over `seconds`."""
    proc, _ = start_node(group, tmp, url, "idle")
    root = psutil.Process(proc.pid)
    time.sleep(5.0)  # past start-up: registration, first requests, imports
    cpu0, _ = tree_usage(root)
    t0, samples = time.monotonic(), []
    while time.monotonic() - t0 < seconds:
        time.sleep(1.0)
        samples.append(tree_usage(root)[1])
    cpu1, _ = tree_usage(root)
    proc.terminate(timeout=30)
    return 100 * (cpu1 - cpu0) / (time.monotonic() - t0), statistics.mean(samples) / 2**20, max(samples) / 2**20


def spike_to_suspension(group: ProcessGroup, tmp: Path, url: str, spikes: int) -> list[float]:
    """Seconds from a hog's start to the status file saying suspended, `spikes` times. The threshold
    (40 % of the machine) sits between this idle network and a hog of one process per core."""
    proc, key = start_node(group, tmp, url, "spiky", "--idle-only", "true", "--max-other-cpu-percent", "40",
                           "--resume-after-seconds", "1")
    poll_status(key, lambda d: d["state"] == "waiting", timeout=60)
    latencies = []
    for _ in range(spikes):
        with CpuHog(psutil.cpu_count() or 2) as hog:
            seen, _ = poll_status(key, lambda d: d["state"] == "suspended", timeout=30, every=0.005)
            latencies.append(seen - hog.started_at)
        poll_status(key, lambda d: d["state"] == "waiting", timeout=60)
        time.sleep(0.5)
    proc.terminate(timeout=30)
    return latencies


async def timed_job(url: str, model: bytes, x: np.ndarray) -> float:
    async with submitter(url) as client:
        digest = await client.ensure_model(model)
        start = time.perf_counter()
        job = await client.submit(digest, {"x": x}, task_size=ROWS_PER_TASK)
        status = await client.wait(job["job"], timeout=600)
        assert status["state"] == "done", status
        return time.perf_counter() - start


def capped_throughput(group: ProcessGroup, tmp: Path, url: str, tasks: int, cap: int) -> float:
    proc, _ = start_node(group, tmp, url, f"cap{cap}", "--idle-only", "false", "--cpu-cap-percent", str(cap))
    model = spinner(seed=cap)  # a model of its own: no other node has it cached or measured
    x = np.random.default_rng(cap).standard_normal((tasks * ROWS_PER_TASK, 256)).astype(np.float32)
    seconds = asyncio.run(timed_job(url, model, x))
    proc.terminate(timeout=30)
    return tasks / seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60.0, help="idle measurement length (default %(default)s)")
    p.add_argument("--spikes", type=int, default=10, help="load spikes timed (default %(default)s)")
    p.add_argument("--tasks", type=int, default=24, help="tasks of ~0.2 s in the throughput job (default %(default)s)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-node-") as d, ProcessGroup(Path(d) / "logs") as group:
        tmp = Path(d)
        url = start_coordinator(group, tmp)
        cpu, rss_mean, rss_peak = idle_daemon(group, tmp, url, args.seconds)
        latencies = spike_to_suspension(group, tmp, url, args.spikes)
        full = capped_throughput(group, tmp, url, args.tasks, 100)
        half = capped_throughput(group, tmp, url, args.tasks, 50)
    print(f"(a) idle daemon over {args.seconds:g} s: CPU {cpu:.2f} % of a core (goal <= 0.5), RSS of its tree "
          f"{rss_mean:.1f} MB mean, {rss_peak:.1f} MB peak (goal <= 80)")
    print(f"(b) load spike to suspended, {len(latencies)} spikes: median {statistics.median(latencies):.3f} s, "
          f"worst {max(latencies):.3f} s (goal <= 1)")
    print(f"(c) one slot, {args.tasks} tasks: cap 100 % {full:.2f} tasks/s, cap 50 % {half:.2f} tasks/s, "
          f"ratio {half / full:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
