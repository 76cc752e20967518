"""Expert-parallel scaling on an expert-heavy tiny model: step time against N, and the
all-to-all bytes moved per step against the per-pair minimum.

The same greedy workload (a batch of concurrent requests: prefill, then decode) runs on
one engine per N. For each N it prints the mean step time, the part of it spent in MoE
all-to-alls (slowest rank), the driver-side control overhead (step time minus the
slowest rank's Worker.execute), and the row bytes sent between ranks per step next to
the per-pair minimum: a dispatcher that sends each (token, expert) pair whose expert is
on another rank must move 2 x such pairs x H x bytes per element (out and back). Ours
sends a token once per rank it needs (with its K local ids and weights appended), so it
moves less whenever a rank owns several of a token's experts. The row-count exchange
([rows, pairs] int64 per peer per rank per layer) is listed apart. Every rank, and the
one-rank engine, computes with one thread, so N ranks could use N cores.

    python benchmarks/ep_scaling.py --sizes 1 2 3 4 --requests 16 --prompt-len 32 --max-tokens 16
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import ray
import torch

from gptoss_ray.checkpoint import write_checkpoint
from gptoss_ray.config import PRESETS, EngineConfig
from gptoss_ray.engine.engine import LLMEngine
from gptoss_ray.sampling_params import SamplingParams


def run(ckpt: Path, ep_size: int, args) -> dict:
    engine = LLMEngine(EngineConfig(
        model=str(ckpt), ep_size=ep_size, worker_num_cpus=0.1, num_kv_blocks=256,
        max_model_len=512, max_num_seqs=64, dtype="float32", device="cpu",
    ))
    try:
        generate(engine, args, requests=2, offset=10_000)  # warm-up: first-touch, allocator, channels
        if ep_size > 1:
            engine.executor.reset_stats()
        t0 = time.perf_counter()
        steps = generate(engine, args, requests=args.requests, offset=0)
        elapsed = time.perf_counter() - t0
        stats = dataclasses.asdict(engine.executor.stats()) if ep_size > 1 else {}
    finally:
        engine.shutdown()
    return dict(steps=steps, step_ms=1e3 * elapsed / steps, **stats)


def generate(engine: LLMEngine, args, requests: int, offset: int) -> int:
    """Greedy batch to completion; returns the number of steps. Distinct prompts per
    call, so the measured run gets no prefix-cache hits from the warm-up."""
    for i in range(requests):
        prompt = [(7 * i + j + offset) % 50000 + 1000 for j in range(args.prompt_len)]
        engine.add_request(f"r{offset}-{i}", prompt, SamplingParams(temperature=0, max_tokens=args.max_tokens,
                                                                      ignore_eos=True))
    steps = 0
    while engine.has_unfinished_requests():
        engine.step()
        steps += 1
    return steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--preset", default="tiny-moe")
    args = p.parse_args()
    logging.getLogger("ray.dag").setLevel(logging.WARNING)  # per-teardown INFO lines
    config = PRESETS[args.preset]
    torch.set_num_threads(1)  # N=1 runs in this process: one thread, as each worker rank
    ray.init(num_cpus=max(args.sizes) + 2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = write_checkpoint(config, Path(tmp) / args.preset, seed=0)
            print(f"{args.preset}: {config.num_local_experts} experts, top-{config.num_experts_per_tok}, "
                  f"H={config.hidden_size}, {config.num_hidden_layers} layers; {args.requests} requests x "
                  f"{args.prompt_len} prompt + {args.max_tokens} output tokens, fp32")
            print(f"{'N':>2} {'steps':>5} {'step ms':>8} {'a2a ms':>7} {'ctrl ms':>7} "
                  f"{'rows B/step':>12} {'pair-min B/step':>15} {'ratio':>6} {'counts B/step':>13}")
            for n in args.sizes:
                r = run(ckpt, n, args)
                if n == 1:
                    print(f"{n:>2} {r['steps']:>5} {r['step_ms']:>8.2f} {'-':>7} {'-':>7} {0:>12} {0:>15}")
                    continue
                splits = config.num_hidden_layers * n * (n - 1) * 2 * 8  # [rows, pairs] int64 per peer
                wire, low = r["mean_wire_bytes_per_step"], r["mean_pair_wire_bytes_per_step"]
                print(f"{n:>2} {r['steps']:>5} {r['step_ms']:>8.2f} {1e3 * r['mean_all_to_all_s_per_step']:>7.2f} "
                      f"{1e3 * r['mean_control_overhead_s_per_step']:>7.2f} {wire:>12.0f} {low:>15.0f} "
                      f"{wire / low:>6.3f} {splits:>13}", flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
