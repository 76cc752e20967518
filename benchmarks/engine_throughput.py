"""Offline generation throughput: our engine vs transformers' `generate` (static batching),
same checkpoint, same machine, same run.

    python benchmarks/engine_throughput.py                       # tiny demo checkpoint, CPU
    python benchmarks/engine_throughput.py --concurrency 1 4 16 64 --output-len 64 --threads 1

Workload per concurrency C: `rounds` x C requests, prompt lengths drawn uniformly from
[min-prompt, max-prompt] (fixed seed), exactly `output-len` greedy tokens each (EOS
ignored). The engine gets every request at once with max_num_seqs=C (continuous
batching: a finished sequence's slot is refilled at once). transformers runs them as
consecutive static batches of C, left-padded, `generate(min_new_tokens=max_new_tokens)`,
which is what people write first. Output tokens/s counts generated tokens only.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import torch


def workload(c: int, rounds: int, min_prompt: int, max_prompt: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed + c)
    lengths = torch.randint(min_prompt, max_prompt + 1, (c * rounds,), generator=g).tolist()
    return [torch.randint(0, 199999, (n,), generator=g).tolist() for n in lengths]


def run_engine(path: str, prompts: list[list[int]], c: int, output_len: int) -> float:
    from gptoss_ray.engine.llm import LLM
    from gptoss_ray.sampling_params import SamplingParams

    blocks = c * -(-(max(map(len, prompts)) + output_len) // 16) + 64
    llm = LLM(model=path, dtype="float32", max_num_seqs=c, num_kv_blocks=blocks, max_num_batched_tokens=2048,
              enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
    return len(prompts) * output_len / elapsed


def run_transformers(path: str, prompts: list[list[int]], c: int, output_len: int) -> float:
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=torch.float32).eval()
    pad = 199999
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), c):
        batch = prompts[i : i + c]
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=output_len, min_new_tokens=output_len,
                                 do_sample=False, eos_token_id=None, pad_token_id=pad)
        assert out.shape[1] == width + output_len
    return len(prompts) * output_len / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny demo checkpoint)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=2, help="requests per concurrency level = rounds x C")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: a shared CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from gptoss_ray.checkpoint import default_demo_checkpoint

    path = args.model or str(default_demo_checkpoint())
    rows = []
    print(f"{'C':>4} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}")
    for c in args.concurrency:
        prompts = workload(c, args.rounds, args.min_prompt, args.max_prompt)
        ours = run_engine(path, prompts, c, args.output_len)
        theirs = run_transformers(path, prompts, c, args.output_len)
        rows.append({"concurrency": c, "engine_tok_s": ours, "transformers_tok_s": theirs, "ratio": ours / theirs})
        print(f"{c:>4} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>6.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
