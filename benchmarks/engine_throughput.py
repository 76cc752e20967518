"""Offline generation throughput: our engine vs transformers' `generate` (static batching),
same checkpoint, same machine, same run.

    python benchmarks/engine_throughput.py                       # tiny demo checkpoint, CPU
    python benchmarks/engine_throughput.py --concurrency 1 4 16 64 --output-len 64 --threads 1

Workload per concurrency C: `rounds` x C requests, prompt lengths drawn uniformly from
[min-prompt, max-prompt], output lengths uniformly from [output-len/4, 7*output-len/4]
(mean output-len; fixed seed), greedy, EOS ignored: each request's own length stands in
for where it would have stopped. The engine gets every request at once with
max_num_seqs=C (continuous batching: a finished sequence's slot is refilled at once).
transformers runs them as consecutive static batches of C, left-padded, each batch
generating as many tokens as its longest request (what a static batch does when its
requests stop at different points), which is what people write first. Output tokens/s
counts each request's own tokens only, for both. --fixed-output makes every output
`output-len` long: static batching's best case.

Both run single-threaded in this process, back to back, `--repeat` times: the table gives
each system's best run and the spread of the per-pair ratios, since on a shared machine
the wall time of any one run depends on what else runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch


def workload(c: int, args) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) for concurrency c; the same for both systems."""
    g = torch.Generator().manual_seed(c)
    num = c * args.rounds
    lengths = torch.randint(args.min_prompt, args.max_prompt + 1, (num,), generator=g).tolist()
    prompts = [torch.randint(0, args.vocab_size - 1, (n,), generator=g).tolist() for n in lengths]
    if args.fixed_output:
        return prompts, [args.output_len] * num
    low, high = max(1, args.output_len // 4), args.output_len * 7 // 4
    return prompts, torch.randint(low, high + 1, (num,), generator=g).tolist()


def run_engine(path: str, prompts: list[list[int]], out_lens: list[int], c: int, dtype: str,
               dequantize: bool | None = None) -> float:
    from gptoss_ray.engine.llm import LLM
    from gptoss_ray.sampling_params import SamplingParams

    per_seq = -(-(max(map(len, prompts)) + max(out_lens)) // 16)  # blocks
    llm = LLM(model=path, dtype=dtype, max_num_seqs=c, num_kv_blocks=c * per_seq + 64, max_model_len=per_seq * 16,
              max_num_batched_tokens=2048, enable_prefix_caching=False, dequantize_experts=dequantize)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompt_token_ids=prompts[:1], sampling_params=SamplingParams(max_tokens=2))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
    wall = time.perf_counter() - start
    assert [len(o.outputs[0].token_ids) for o in outs] == out_lens
    return sum(out_lens) / wall


def run_transformers(path: str, prompts: list[list[int]], out_lens: list[int], c: int, dtype: str) -> float:
    from transformers import GptOssForCausalLM, Mxfp4Config

    model = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True),
                                              dtype=getattr(torch, dtype)).eval()
    pad = model.config.vocab_size - 1  # never in a prompt (the workload draws below it)
    model.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=pad)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(prompts), c):
        batch, new_tokens = prompts[i : i + c], max(out_lens[i : i + c])
        width = max(map(len, batch))
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, eos_token_id=None, pad_token_id=pad)
        assert out.shape[1] == width + new_tokens
    wall = time.perf_counter() - start
    return sum(out_lens) / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the tiny demo checkpoint)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--rounds", type=int, default=8,
                   help="requests per concurrency level = rounds x C (enough that the final drain, where few "
                   "requests are left running, is a small part of the run, as in any real offline job)")
    p.add_argument("--min-prompt", type=int, default=16)
    p.add_argument("--max-prompt", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64, help="mean output length")
    p.add_argument("--fixed-output", action="store_true", help="every output exactly --output-len tokens")
    p.add_argument("--repeat", type=int, default=2,
                   help="run the two systems back to back this many times: each one's best, and the spread of "
                   "the per-pair ratios (a shared machine's noise)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and activations, the same for both systems")
    p.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1: a shared CPU)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--packed-experts", action="store_true",
                   help="engine keeps MXFP4 experts packed (the GPU layout) instead of its CPU default, unpacking "
                   "them at load as transformers does (EngineConfig.dequantize_experts)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    from gptoss_ray.checkpoint import default_demo_checkpoint

    path = args.model or str(default_demo_checkpoint())
    from gptoss_ray.config import ModelConfig

    args.vocab_size = ModelConfig.from_json_file(f"{path}/config.json").vocab_size
    rows = []
    print(f"{'C':>4} {'engine tok/s':>13} {'transformers tok/s':>19} {'ratio':>7}   "
          f"paired ratios (min / median / max of {args.repeat})")
    for c in args.concurrency:
        prompts, out_lens = workload(c, args)
        pairs = []  # (engine, transformers) tok/s, measured back to back
        for _ in range(args.repeat):
            ours = run_engine(path, prompts, out_lens, c, args.dtype, False if args.packed_experts else None)
            pairs.append((ours, run_transformers(path, prompts, out_lens, c, args.dtype)))
        ours, theirs = max(p[0] for p in pairs), max(p[1] for p in pairs)
        paired = sorted(e / t for e, t in pairs)
        rows.append({"concurrency": c, "engine_tok_s": ours, "transformers_tok_s": theirs, "ratio": ours / theirs,
                     "pairs": pairs, "paired_ratio_median": statistics.median(paired)})
        print(f"{c:>4} {ours:>13.1f} {theirs:>19.1f} {ours / theirs:>6.2f}x   "
              f"{paired[0]:.2f}x / {statistics.median(paired):.2f}x / {paired[-1]:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
