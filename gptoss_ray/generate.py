"""`gptoss-ray generate`: render one harmony chat, generate offline, print the parsed reply.

    gptoss-ray generate --prompt "Why is the sky blue?" --reasoning-effort low
    gptoss-ray generate --model /models/gpt-oss-20b --prompt "..." --max-tokens 512

Without --model it runs the built-in tiny demo checkpoint (random weights: the reply is
gibberish, but every stage from rendering to parsing runs for real).
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="checkpoint directory or hub id (default: the tiny demo checkpoint)")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="optional system (developer) instructions")
    p.add_argument("--reasoning-effort", choices=["low", "medium", "high"], default="medium")
    p.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--ep-size", type=int, default=1, help="expert-parallel workers (GPUs)")
    p.add_argument("--kv-cache-memory-gb", type=float, default=None, help="KV cache budget per worker")
    p.add_argument("--show-tokens", action="store_true", help="also print the raw generated token ids")


def run(args: argparse.Namespace) -> int:
    from gptoss_ray.engine.llm import LLM
    from gptoss_ray.harmony.parse import parse_completion
    from gptoss_ray.harmony.render import render_chat
    from gptoss_ray.sampling_params import SamplingParams

    messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
        {"role": "user", "content": args.prompt}
    ]
    rendered = render_chat(messages, reasoning_effort=args.reasoning_effort)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_tokens=args.max_tokens)
    engine_kwargs = {"kv_cache_memory_gb": args.kv_cache_memory_gb} if args.kv_cache_memory_gb else {}
    if args.model is None:  # the demo model is tiny: a small pool allocates instantly
        engine_kwargs.setdefault("num_kv_blocks", 1024)
    with LLM(model=args.model, dtype=args.dtype, ep_size=args.ep_size, **engine_kwargs) as llm:
        max_tokens = min(args.max_tokens, llm.max_model_len - len(rendered.token_ids))
        params.max_tokens = max(1, max_tokens)
        out = llm.generate(prompt_token_ids=[rendered.token_ids], sampling_params=params)[0].outputs[0]
    reply = parse_completion(out.token_ids)
    if reply.reasoning:
        print(f"[analysis]\n{reply.reasoning.strip()}\n")
    print(f"[final]\n{reply.content.strip()}")
    for call in reply.tool_calls:
        print(f"[tool call] {call.name}({call.arguments})")
    print(f"\n({len(rendered.token_ids)} prompt tokens, {len(out.token_ids)} generated, "
          f"finish: {out.finish_reason})", file=sys.stderr)
    if args.show_tokens:
        print(out.token_ids)
    return 0
