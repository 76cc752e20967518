"""Constrained decoding costs on the 201,088-token o200k_harmony vocabulary (issue 15).

    python benchmarks/constrained.py                 # CPU: adapter build, compile per schema, per-step overhead
    python benchmarks/constrained.py --device cuda   # mask applied on the GPU (the mask is still built on CPU)
    python benchmarks/constrained.py --compare       # also xgrammar's adapter / compile / mask, if installed

Per-step overhead = what a step with C constrained rows adds: build the C token bitmasks
(llguidance, on the CPU, in the matchers' current states: mid-analysis and mid-JSON) + copy
them to the device + apply them to [C, V] logits. Matchers are advanced between steps by a
random allowed token (not timed), so the states move the way a random model moves them.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.schemas import SCHEMAS  # noqa: E402  (the 37 schemas of the tests)

from gptoss_ray.config import HARMONY_VOCAB_SIZE  # noqa: E402
from gptoss_ray.engine.structured import GrammarMasks, GrammarState, apply_token_bitmask  # noqa: E402
from gptoss_ray.harmony import guidance  # noqa: E402
from gptoss_ray.harmony.grammar import chat_grammar  # noqa: E402


def _grammar(schema: dict) -> str:
    return chat_grammar({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, None, None,
                        max_tokens=512, max_reasoning_tokens=16, max_string_length=64)


def _allowed(mask_row: torch.Tensor) -> list[int]:
    bits = ((mask_row.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1).bool().reshape(-1)
    return bits[:HARMONY_VOCAB_SIZE].nonzero().squeeze(1).tolist()


def step_overhead(rows: int, device: torch.device, steps: int, rng: random.Random) -> dict[str, float]:
    grammars = [_grammar(SCHEMAS[i % len(SCHEMAS)]) for i in range(rows)]
    states = [GrammarState.start(g, []) for g in grammars]
    masks = GrammarMasks(rows, HARMONY_VOCAB_SIZE, device)
    logits = torch.randn(rows, HARMONY_VOCAB_SIZE, device=device)
    index = torch.arange(rows, device=device)
    build, apply = [], []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        mask = masks.fill(states)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        apply_token_bitmask(logits, index, mask)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        build.append(t1 - t0)
        apply.append(t2 - t1)
        host = masks.host[:rows]
        for i, st in enumerate(states):  # not timed: move each matcher on by an allowed token
            if st.matcher.is_stopped():
                states[i] = GrammarState.start(grammars[i], [])
            else:
                st.advance(rng.choice(_allowed(host[i])))
        logits.normal_()
    ms = lambda xs: 1e3 * statistics.median(xs)  # noqa: E731
    return {"rows": rows, "build_ms": ms(build), "apply_ms": ms(apply), "total_ms": ms([a + b for a, b in zip(build, apply)])}


def compile_times() -> list[float]:
    guidance.tokenizer()
    out = []
    for schema in SCHEMAS:
        g = _grammar(schema)
        t0 = time.perf_counter()
        m = guidance.matcher(g)
        m.compute_bitmask()  # llguidance compiles lazily: the first mask finishes the job
        out.append(time.perf_counter() - t0)
    return out


def compare_xgrammar() -> None:
    try:
        import xgrammar as xgr
    except ImportError:
        print("xgrammar not installed; skipped")
        return
    from gptoss_ray.harmony.encoding import DATA_DIR, VOCAB_FILE, get_encoding

    t0 = time.perf_counter()
    vocab = [b""] * HARMONY_VOCAB_SIZE
    for line in open(DATA_DIR / VOCAB_FILE, "rb"):
        tok, rank = line.split()
        vocab[int(rank)] = base64.b64decode(tok)
    enc = get_encoding()
    for t in enc.special_tokens_set:
        i = enc.encode(t, allowed_special="all")[0]
        if i < HARMONY_VOCAB_SIZE:
            vocab[i] = t.encode()
    info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.RAW, vocab_size=HARMONY_VOCAB_SIZE,
                             stop_token_ids=[200002, 200012])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    print(f"xgrammar  adapter build (vocab read + TokenizerInfo): {time.perf_counter() - t0:.2f} s")
    times, mask_times = [], []
    bitmask = xgr.allocate_token_bitmask(1, HARMONY_VOCAB_SIZE)
    for schema in SCHEMAS:
        t1 = time.perf_counter()
        compiled = compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)
        times.append(time.perf_counter() - t1)
        m = xgr.GrammarMatcher(compiled)
        t2 = time.perf_counter()
        m.fill_next_token_bitmask(bitmask)
        mask_times.append(time.perf_counter() - t2)
    print(f"xgrammar  compile per schema: median {1e3 * statistics.median(times):.1f} ms, "
          f"max {1e3 * max(times):.1f} ms; first mask median {1e3 * statistics.median(mask_times):.3f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--compare", action="store_true", help="also measure xgrammar")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    guidance.tokenizer()
    print(f"llguidance adapter build (vocab read + LLTokenizer): {time.perf_counter() - t0:.2f} s")
    times = compile_times()
    print(f"llguidance compile per schema ({len(times)} schemas, harmony grammar + first mask): "
          f"median {1e3 * statistics.median(times):.1f} ms, max {1e3 * max(times):.1f} ms")
    if args.compare:
        compare_xgrammar()
    rng = random.Random(0)
    device = torch.device(args.device)
    print(f"per-step overhead on {device} (median of {args.steps} steps)")
    print("| constrained rows | mask build (ms) | mask apply (ms) | total (ms) |")
    print("|---|---|---|---|")
    for rows in args.rows:
        r = step_overhead(rows, device, args.steps, rng)
        print(f"| {r['rows']} | {r['build_ms']:.3f} | {r['apply_ms']:.3f} | {r['total_ms']:.3f} |")


if __name__ == "__main__":
    main()
