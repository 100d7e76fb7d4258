"""The saboteur table of issue 8 ("Proof, measured"), from the simulation in tests/sabotage.py.

    python benchmarks/bench_sabotage.py [--nodes 60] [--jobs 5] [--tasks 250] [--warmup 2] [--seed 1]

For f = 0.05, 0.2 and 0.4 and each behaviour, `--nodes` simulated nodes (a fraction f hostile, each
its own owner; the Sybil party's accounts too) run `--jobs` jobs of `--tasks` one-row tasks, one job
after another, through the real coordinator engine with the service's defaults (k = 2, 60 s leases,
TrustPolicy()), on a simulated clock. Prints a markdown table with theory beside it; takes well under a
minute on 2 cores (every run is in-process and single-threaded).

Columns: accepted = tasks verified at the end; wrong at end = of those, the ones whose output is
wrong (rate; how many came from a node caught after the result was accepted, which should have been
reopened); wrong at job end = wrong outputs in each job at the moment it first finished, what its
submitter got; results and audits per accepted task, over the whole run and (in brackets) over the
jobs after the `--warmup` ones in which nodes earn trust; own results until blocked = results each
saboteur's owner returned before it was blocked, and how many never were; saboteur credit = their net
share of all credit after claw-backs. Theory: first-two-agree f^2(3-2f) for colluders; Sarmenta's
spot-check bound s f (1-qs)^n / ((1-f) + f (1-qs)^n) with q the audit rate a saboteur first meets
(1 while untrusted, max(min_audit_rate, 1/trusted_after) once trusted), n its mean results, s its
share of wrong answers.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.sabotage import Behaviour, Report, Scenario, Simulation, markdown  # noqa: E402

FRACTIONS = (0.05, 0.2, 0.4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=60)
    parser.add_argument("--jobs", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=250)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    # The engine logs every result shown wrong at WARNING: thousands of lines here.
    logging.getLogger("sparecycles").setLevel(logging.ERROR)

    started = time.perf_counter()
    reports: list[Report] = []
    scenarios = [Scenario(behaviour=Behaviour.HONEST, nodes=args.nodes, jobs=args.jobs, tasks_per_job=args.tasks,
                          warmup_jobs=args.warmup, seed=args.seed)]
    scenarios += [Scenario(behaviour=b, fraction=f, nodes=args.nodes, jobs=args.jobs, tasks_per_job=args.tasks,
                           warmup_jobs=args.warmup, seed=args.seed)
                  for f in FRACTIONS for b in Behaviour if b is not Behaviour.HONEST]
    for sc in scenarios:
        t0 = time.perf_counter()
        reports.append(Simulation(sc).run())
        print(f"{sc.behaviour.value:>13} f={sc.fraction:.2f}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    print(f"{args.nodes} nodes, {args.jobs} jobs of {args.tasks} tasks, k=2, seed {args.seed}; "
          f"{time.perf_counter() - started:.0f} s\n")
    print(markdown(reports))


if __name__ == "__main__":
    main()
