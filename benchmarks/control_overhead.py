"""Control overhead per step: engine -> N worker actors -> engine, the model excluded.

Each rank runs a worker that does no compute: it answers a decode StepPlan of
`--seqs` sequences (spread over the ranks) with one token per sequence of its rank,
so what is timed is the plan's trip out, the results' trip back and Ray's own work.
Both transports are measured in the same run: Ray compiled graphs (what RayExecutor
uses) and one plain `actor.step.remote()` per rank per step.

    python benchmarks/control_overhead.py --sizes 1 2 4 --steps 500 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import ray

from gptoss_ray.engine.plan import RankPlan, StepPlan, StepResult
from gptoss_ray.parallel.worker_group import WorkerGroup, WorkerGroupConfig


class NullWorker:
    """Answers a plan for its rank without running a model."""

    model = None

    def __init__(self, rank: int, experts: range):
        self.rank = rank

    def execute(self, plan: StepPlan) -> StepResult:
        mine = plan.ranks[self.rank]
        return StepResult(seq_ids=list(mine.seq_ids), token_ids=[0] * len(mine.seq_ids),
                          logprobs=[None] * len(mine.seq_ids))


def decode_plan(step_id: int, num_ranks: int, num_seqs: int) -> StepPlan:
    ranks = [RankPlan() for _ in range(num_ranks)]
    for s in range(num_seqs):
        ranks[s % num_ranks].seq_ids.append(s)
        ranks[s % num_ranks].num_new_tokens.append(1)
    return StepPlan(step_id=step_id, ranks=ranks)


def measure(n: int, compiled: bool, steps: int, num_seqs: int) -> list[float]:
    config = WorkerGroupConfig(ep_size=n, num_experts=128, worker_num_cpus=0.01,
                               use_compiled_graph=compiled)
    group = WorkerGroup(config, NullWorker)
    group.start()
    try:
        for i in range(20):  # warm-up: channels, serializers, caches
            group.step(decode_plan(i, n, num_seqs))
        times = []
        for i in range(steps):
            plan = decode_plan(i, n, num_seqs)
            t0 = time.perf_counter()
            outputs = group.step(plan)
            times.append(time.perf_counter() - t0)
            assert sum(len(o.result.seq_ids) for o in outputs) == num_seqs
        return times
    finally:
        group.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--seqs", type=int, default=64, help="decoding sequences in each step's plan")
    p.add_argument("--repeats", type=int, default=3,
                   help="runs per setting; the run with the lowest median is shown (shared, noisy hosts)")
    args = p.parse_args()
    logging.getLogger("ray.dag").setLevel(logging.WARNING)  # per-teardown INFO lines
    ray.init(num_cpus=max(args.sizes) + 2, include_dashboard=False, log_to_driver=False)
    try:
        print(f"control overhead per step, {args.seqs} decoding sequences, {args.steps} steps, "
              f"best of {args.repeats} runs (median / p90 ms)")
        print(f"{'N':>3} {'compiled graph':>18} {'plain remote calls':>20}")
        for n in args.sizes:
            row = []
            for compiled in (True, False):
                runs = [sorted(measure(n, compiled, args.steps, args.seqs)) for _ in range(args.repeats)]
                t = min(runs, key=statistics.median)
                row.append(f"{statistics.median(t) * 1e3:7.3f} / {t[int(0.9 * len(t))] * 1e3:6.3f}")
            print(f"{n:>3} {row[0]:>18} {row[1]:>20}", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
