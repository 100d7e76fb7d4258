"""End-to-end speed of a sparecycles network on this machine, measured side by side in one run.

    python benchmarks/bench_network.py [--tasks 2000] [--rows 200000] [--latency-runs 200] [--repeats 3]

Starts its own Mosquitto (deploy/mosquitto.conf, TCP_NODELAY, free port), a coordinator on a
temporary SQLite file and two node daemons of different owners (one slot each: 2 cores), then:
1. verified tasks/s at k=2 with a tiny model and one row per task (the network path dominates);
2. rows/s of a large job through the network against plain local onnxruntime on the same cores;
3. p50/p99 submit-to-result latency of a one-task job (POST job, long-poll status, GET outputs).
Prints medians over --repeats and the ratios. Stops exactly the processes it started.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protocol.signing import Identity  # noqa: E402
from sparecycles.cli.accounts import ensure_account  # noqa: E402
from sparecycles.cli.processes import ProcessGroup, free_port  # noqa: E402
from sparecycles.sdk import Client  # noqa: E402
from tests.models import classifier, deep_mlp  # noqa: E402


async def mqtt_reference(broker_port: int, count: int = 5000) -> float:
    """Raw QoS-1 messages/s through the same broker with the same client library (200 B, one
    publisher with 20 in flight, one subscriber): the yardstick for this machine at this moment.
    Each verified task at k=2 needs at least 4 such messages (2 assignments, 2 results)."""
    import socket

    import aiomqtt

    opts = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    async with aiomqtt.Client("127.0.0.1", broker_port, socket_options=opts, max_inflight_messages=100) as sub, \
            aiomqtt.Client("127.0.0.1", broker_port, socket_options=opts, max_inflight_messages=100) as pub:
        pub.pending_calls_threshold = 100  # pipelining here is deliberate: no warning per publish
        await sub.subscribe("bench/ref", qos=1)
        received, last = 0, time.perf_counter()

        async def receive() -> None:
            nonlocal received, last
            async for _ in sub.messages:
                received, last = received + 1, time.perf_counter()
                if received == count:
                    return

        receiver = asyncio.create_task(receive())
        t0 = time.perf_counter()
        for _ in range(0, count, 20):
            await asyncio.gather(*(pub.publish("bench/ref", b"x" * 200, qos=1) for _ in range(20)))
        try:
            async with asyncio.timeout(10):  # a broker may drop past its queue limit: count what came
                await receiver
        except TimeoutError:
            receiver.cancel()
        return received / (last - t0)


def start_network(group: ProcessGroup, tmp: Path, coordinator_args: list[str],
                  node_args: list[str]) -> tuple[str, int]:
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker_port, http_port = free_port(), free_port()
    if Path(mosquitto).exists():
        conf = (ROOT / "deploy" / "mosquitto.conf").read_text()
        (tmp / "mosquitto.conf").write_text(conf.replace("listener 1883", f"listener {broker_port} 127.0.0.1"))
        group.start_command([mosquitto, "-c", str(tmp / "mosquitto.conf")], name="mosquitto", port=broker_port)
    else:
        print("mosquitto not found: using the embedded broker (slower)", file=sys.stderr)
        group.start("sparecycles.cli.broker", ["--listen", f"127.0.0.1:{broker_port}"], ready=r"broker ready")
    broker = f"mqtt://127.0.0.1:{broker_port}"
    url = f"http://127.0.0.1:{http_port}"
    group.start("coordinator", ["--broker", broker, "--db", f"sqlite:///{tmp}/bench.db", "--http",
                                f"127.0.0.1:{http_port}", "--log-level", "WARNING", *coordinator_args],
                ready=r"coordinator ready")
    for owner in ("alice", "bob"):
        group.start("node", ["--broker", broker, "--coordinator", url, "--key", str(tmp / f"{owner}.key"),
                             "--owner", owner, "--slots", "1", "--cache-dir", str(tmp / owner),
                             # --idle-only false: one machine, see tests/conftest.py
                             "--log-level", "WARNING", "--idle-only", "false", *node_args],
                    ready=r"node ready", name=f"node-{owner}")
    return url, broker_port


async def timed_job(c: Client, model: str, x: np.ndarray, task_size: int | None) -> tuple[float, dict]:
    t0 = time.perf_counter()
    job = await c.submit(model, {"x": x}, task_size=task_size)
    status = await c.wait(job["job"], poll=5.0, timeout=600)
    return time.perf_counter() - t0, status


def local_rows_per_second(model: bytes, x: np.ndarray, task_size: int) -> float:
    """Plain onnxruntime on the same two cores, over the same task-sized batches, computed once
    (the network computes every row k=2 times: a ratio of 0.5 would be a free network)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": x[:task_size]})  # warm-up, as the nodes' sessions are warm
    t0 = time.perf_counter()
    for start in range(0, len(x), task_size):
        sess.run(None, {"x": x[start:start + task_size]})
    return len(x) / (time.perf_counter() - t0)


async def bench(url: str, broker_port: int, args: argparse.Namespace) -> None:
    model_bytes = classifier(features=8, classes=4)
    rng = np.random.default_rng(0)
    # Every request is signed by a registered submitter, as on any coordinator since accounts.
    async with Client(url, identity=Identity.generate()) as c:
        await ensure_account(c, "bench")
        model = await c.ensure_model(model_bytes)
        await timed_job(c, model, rng.standard_normal((64, 8)).astype(np.float32), 8)  # warm up caches

        tps = []
        for _ in range(args.repeats):
            x = rng.standard_normal((args.tasks, 8)).astype(np.float32)
            seconds, status = await timed_job(c, model, x, 1)
            assert status["tasks"]["verified"] == args.tasks
            tps.append(args.tasks / seconds)
        ref = [await mqtt_reference(broker_port) for _ in range(args.repeats)]
        t, r = statistics.median(tps), statistics.median(ref)
        print(f"verified tasks/s at k=2 (1 row/task, {args.tasks} tasks): median {t:,.0f} "
              f"(runs: {', '.join(f'{v:,.0f}' for v in tps)})")
        print(f"reference: raw QoS-1 MQTT msgs/s through the same broker: median {r:,.0f}; "
              f"verified tasks per raw message {t / r:.3f} (a task is >= 4 message items; batching carries "
              f"several items per message, so above 0.25 means batching pays)")

        heavy_bytes = deep_mlp()
        heavy = await c.ensure_model(heavy_bytes)
        for name, digest, raw, width, rows, task_size in (
                ("tiny classifier (68 FLOP/row)", model, model_bytes, 8, args.rows, 4096),
                ("deep MLP (1.8 MFLOP/row)", heavy, heavy_bytes, 384, args.rows // 2, None)):
            net, loc = [], []
            for _ in range(args.repeats):
                x = rng.standard_normal((rows, width)).astype(np.float32)
                seconds, status = await timed_job(c, digest, x, task_size)
                net.append(rows / seconds)
                loc.append(local_rows_per_second(raw, x, int(status["task_size"])))  # the size the job used
            n, lo = statistics.median(net), statistics.median(loc)
            print(f"rows/s, {name}, {rows} rows in tasks of {task_size or 'auto'}: network (k=2) {n:,.0f}, "
                  f"local onnxruntime {lo:,.0f}; ratio {n / lo:.3f} (k=2 computes every row twice: ideal 0.5)")

        lat: list[float] = []
        steps: list[tuple[float, float, float]] = []
        one = rng.standard_normal((1, 8)).astype(np.float32)
        for _ in range(args.latency_runs):
            t0 = time.perf_counter()
            job = await c.submit(model, {"x": one}, task_size=1)
            t1 = time.perf_counter()
            await c.wait(job["job"], poll=10.0, timeout=60)
            t2 = time.perf_counter()
            await c.outputs(job["job"])
            t3 = time.perf_counter()
            lat.append((t3 - t0) * 1000)
            steps.append(((t1 - t0) * 1000, (t2 - t1) * 1000, (t3 - t2) * 1000))
        q = statistics.quantiles(lat, n=100)
        submit, wait, fetch = (statistics.median(s) for s in zip(*steps, strict=True))
        print(f"submit-to-result latency, one-task job ({args.latency_runs} runs): "
              f"p50 {statistics.median(lat):.2f} ms, p99 {q[98]:.2f} ms "
              f"(medians: submit {submit:.2f}, run and verify {wait:.2f}, outputs {fetch:.2f} ms)")
        counters = await _health(url)
        verified = counters.get("task_verified", 0)
        if verified:
            print(f"verification: {verified:,} tasks verified, {counters.get('solo_issued', 0):,} run alone on trusted "
                  f"nodes, {counters.get('audits_run', 0):,} audits ({counters.get('audits_run', 0) / verified:.3f} "
                  f"per task, {counters.get('audit_ms', 0) / 1000:.1f} s of coordinator time)")


async def _health(url: str) -> dict[str, int]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{url}/v1/health") as r:
        return dict((await r.json()).get("counters", {}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=2000)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--latency-runs", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--coordinator-args", default="", metavar="ARGS",
                   help="extra coordinator flags, e.g. '--no-adaptive' to run every task on k=2 owners")
    p.add_argument("--node-args", default="", metavar="ARGS",
                   help="extra node flags, e.g. '--nice 0': the run workers' default lowest priority makes them "
                        "wait behind the coordinator and this client when all share one machine's cores")
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sparecycles-bench-"))
    try:
        with ProcessGroup(tmp / "logs") as group:
            url, broker_port = start_network(group, tmp, shlex.split(args.coordinator_args),
                                             shlex.split(args.node_args))
            asyncio.run(bench(url, broker_port, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
