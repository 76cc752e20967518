"""Decode tok/s, eager vs the static decode runner (CUDA graphs on CUDA), on a random
checkpoint of gpt-oss-20b's layer shape with few layers (the step's launch count per layer,
what graphs remove, does not depend on the depth).

    python benchmarks/graph_decode.py                          # on a CUDA box: eager vs graphs
    python benchmarks/graph_decode.py --preset tiny --device cpu   # smoke run: eager vs static, no graphs

Each engine gets `batch` requests of 16 prompt tokens; after the prefill step, `steps` pure
decode steps are timed (engine.step() returns after the sampler has read the tokens, so the
wall time is the device's). Prints one line per (mode, batch) and the graph capture time and
memory the runner logged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def write(preset: str, layers: int, out: str) -> str:
    from gptoss_ray.checkpoint import write_checkpoint
    from gptoss_ray.config import PRESETS, ModelConfig

    base = PRESETS[preset].to_hf_dict()
    base.pop("layer_types")  # re-derived for the new depth
    return str(write_checkpoint(ModelConfig.from_dict(base | {"num_hidden_layers": layers}), out, seed=0, num_shards=1))


def decode_tok_s(engine, batch: int, steps: int, repeats: int) -> float:
    from gptoss_ray.sampling_params import SamplingParams

    rates = []
    for r in range(repeats + 1):  # the first round warms up
        params = SamplingParams(temperature=0.0, max_tokens=steps + 1, ignore_eos=True)
        for i in range(batch):
            engine.add_request(f"{r}-{i}", [(7 * i + j) % 1000 + 10 for j in range(16)], params)
        engine.step()  # the prefill (and first token)
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        elapsed = time.perf_counter() - start
        while engine.has_unfinished_requests():
            engine.step()
        if r:
            rates.append(batch * steps / elapsed)
    return statistics.median(rates)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from gptoss_ray.config import EngineConfig
    from gptoss_ray.engine.engine import LLMEngine

    torch.set_num_threads(max(1, torch.get_num_threads()))
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    rows, capture = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        path = write(args.preset, args.layers, tmp)
        for mode in ("eager", "graph"):
            static = mode == "graph"
            config = EngineConfig(model=path, device=args.device, dtype=dtype, max_num_seqs=max(args.batch),
                                  max_model_len=256, num_kv_blocks=max(args.batch) * 16 + 16, block_size=16,
                                  enforce_eager=not static, static_decode=static)
            start = time.perf_counter()
            engine = LLMEngine(config)
            load_s = time.perf_counter() - start
            runner = engine.executor.worker.decode_runner
            if runner is not None and runner.graphs:
                capture = {"capture_s": round(runner.capture_s, 2), "graphs": len(runner.graphs),
                           "graph_memory_mib": round(runner.graph_memory_bytes / 2**20, 1)}
            for b in args.batch:
                rows.append({"mode": mode if runner is None or runner.graphs else "static (no graphs)",
                             "batch": b, "decode_tok_s": round(decode_tok_s(engine, b, args.steps, args.repeats), 1),
                             "engine_start_s": round(load_s, 1)})
            del engine
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(f"device={args.device} preset={args.preset} layers={args.layers} dtype={dtype} steps={args.steps}")
    print(f"{'mode':>20} {'batch':>5} {'decode tok/s':>13}")
    for r in rows:
        print(f"{r['mode']:>20} {r['batch']:>5} {r['decode_tok_s']:>13}")
    print("capture:", json.dumps(capture) if capture else "no graphs captured")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "capture": capture}, f, indent=1)


if __name__ == "__main__":
    main()
