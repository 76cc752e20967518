"""Where an in-process engine's time goes, by part: the model's attention and MoE blocks, the
rest of its forward, the unembedding, the sampler, and everything else a step does.

    python benchmarks/step_breakdown.py --model /tmp/peer/tiny-gptoss                  # the shared peer workload, bf16
    python benchmarks/step_breakdown.py --model /tmp/peer/tiny-gptoss --dtype float32 --prompt-len 32 --output-len 32

It wraps the worker's calls with wall-clock timers (no profiler, so no per-op overhead) and
runs `--runs` generates of `--num-prompts` random prompts after one warm-up, greedy, EOS
ignored; it prints milliseconds per run for each part. The parts nest: `model` includes
`attn` and `moe`; `engine.step` includes all of them.
"""

from __future__ import annotations

import argparse
import collections
import random
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint (default: the tiny demo model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from gptoss_ray.engine.llm import LLM
    from gptoss_ray.sampling_params import SamplingParams

    model = args.model
    if model is None:
        from gptoss_ray.checkpoint import default_demo_checkpoint

        model = str(default_demo_checkpoint())
    rng = random.Random(0)
    prompts = [[rng.randrange(0, 199998) for _ in range(args.prompt_len)] for _ in range(args.num_prompts)]
    per_seq = -(-(args.prompt_len + args.output_len) // 16)
    llm = LLM(model=model, dtype=args.dtype, max_num_seqs=args.num_prompts,
              num_kv_blocks=args.num_prompts * per_seq + 64, max_model_len=1024, enable_prefix_caching=False)
    worker = llm.engine.executor.worker
    spent: dict[str, float] = collections.defaultdict(float)

    def timed(fn, label):
        def call(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[label] += time.perf_counter() - start
        return call

    net = worker.model
    net.forward = timed(net.forward, "model")
    net.compute_logits = timed(net.compute_logits, "logits (unembedding)")
    for layer in net.model.layers:
        layer.self_attn.forward = timed(layer.self_attn.forward, "attn")
        layer.mlp.forward = timed(layer.mlp.forward, "moe")
    worker.sampler = timed(worker.sampler, "sampler")
    llm.engine.step = timed(llm.engine.step, "engine.step")
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts, sampling_params=params)  # warm-up
    spent.clear()
    start = time.perf_counter()
    for _ in range(args.runs):
        llm.generate(prompt_token_ids=prompts, sampling_params=params)
    total = (time.perf_counter() - start) / args.runs
    tokens = args.num_prompts * args.output_len
    print(f"{args.num_prompts} x {args.prompt_len} in, {args.output_len} out, {args.dtype}, {args.threads} threads: "
          f"{total * 1e3:.0f} ms per run ({tokens / total:,.0f} output tok/s)")
    for label in ("engine.step", "model", "attn", "moe", "logits (unembedding)", "sampler"):
        print(f"  {label:22s} {spent[label] / args.runs * 1e3:8.0f} ms per run")


if __name__ == "__main__":
    main()
