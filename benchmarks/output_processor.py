"""Time per output token of the output processor (gptoss_ray/output/), with stop strings,
as the output grows: it must stay flat (issue 16: a 1 MB output with stop strings costs
O(tokens); issue 13: one long stop string stalled every request).

Synthetic token streams (ordinary o200k tokens, seeded) go through OutputProcessor one
token per delta, as the engine delivers them in decode steps, with stop strings that
never match (so every token is searched): several short ones plus one of the maximum
length (sampling_params.MAX_STOP_CHARS). `--old` also times what the engine did before
(re-decode the whole output and search it, per token) at the smaller sizes.

    python benchmarks/output_processor.py                 # text and chat modes, 1k..32k tokens
    python benchmarks/output_processor.py --old           # plus the old per-token full re-decode
"""

from __future__ import annotations

import argparse
import random
import time

from gptoss_ray.harmony.encoding import decode, get_encoding
from gptoss_ray.output import OutputProcessor
from gptoss_ray.sampling_params import MAX_STOP_CHARS, SamplingParams, TokenDelta

STOPS = ["\n\n\n###", "</answer>", "User:", "never-appears-" * 4, "Z" * MAX_STOP_CHARS]


def token_stream(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    enc = get_encoding()
    # ordinary tokens only (no specials, no bytes that need a partner), so the text grows steadily
    out: list[int] = []
    while len(out) < n:
        t = rng.randrange(1000, 199000)
        if not enc.is_special_token(t) and "\ufffd" not in decode([t]) and "Z" not in decode([t]):
            out.append(t)
    return out


def time_processor(tokens: list[int], harmony: bool) -> tuple[float, int]:
    """(seconds, characters of visible text) to push `tokens` one per delta."""
    params = SamplingParams(max_tokens=len(tokens) + 16, stop=STOPS)
    proc = OutputProcessor(params, harmony=harmony)
    header = get_encoding().encode("<|channel|>final<|message|>", allowed_special="all") if harmony else []
    for t in header:
        proc.process(TokenDelta("r", 0, [t]))
    chars = 0
    start = time.perf_counter()
    for i, t in enumerate(tokens):
        out = proc.process(TokenDelta("r", 0, [t], finish_reason="length" if i == len(tokens) - 1 else None))
        chars += len(out.text) + sum(len(p.text) for p in out.pieces)
    return time.perf_counter() - start, chars


def time_old(tokens: list[int]) -> float:
    """The engine's old stop check: decode the whole output again and search it, per token."""
    start = time.perf_counter()
    for k in range(1, len(tokens) + 1):
        text = decode(tokens[:k])
        for s in STOPS:
            text.find(s, max(0, len(text) - 64 - len(s)))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="1024,4096,16384,32768")
    ap.add_argument("--old", action="store_true", help="also time the old full re-decode (sizes <= 8192)")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    streams = {n: token_stream(n, seed=n) for n in sizes}
    time_processor(streams[sizes[0]], False)  # warm-up: encoding load, caches
    print(f"stop strings: {len(STOPS)}, longest {max(map(len, STOPS))} chars; one token per delta")
    print(f"{'tokens':>7} {'chars':>8} {'text us/tok':>12} {'chat us/tok':>12}" + (f" {'old us/tok':>11}" if args.old else ""))
    for n in sizes:
        text_s, chars = time_processor(streams[n], harmony=False)
        chat_s, _ = time_processor(streams[n], harmony=True)
        row = f"{n:>7} {chars:>8} {text_s / n * 1e6:>12.1f} {chat_s / n * 1e6:>12.1f}"
        if args.old:
            row += f" {time_old(streams[n]) / n * 1e6:>11.1f}" if n <= 8192 else f" {'-':>11}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
