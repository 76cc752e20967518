"""`gptoss-ray inspect MODEL`: locate and validate a checkpoint without loading it, and
say what serving it takes. The quickest way to find a bad download before a cluster
spends minutes starting."""

from __future__ import annotations

import argparse

from gptoss_ray.checkpoint.locate import locate
from gptoss_ray.checkpoint.read import CheckpointReader


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint directory or hub id (e.g. openai/gpt-oss-120b)")
    p.add_argument("--ep-size", type=int, default=1, help="show the per-worker expert share for N workers")


def run(args: argparse.Namespace) -> int:
    reader = CheckpointReader(locate(args.model))
    c = reader.config
    expert_bytes = sum(reader.nbytes(name) for name, spec in reader.specs.items() if spec.is_expert)
    total = reader.file_bytes()
    n = max(1, args.ep_size)
    print(f"{reader.path}")
    print(
        f"  layers {c.num_hidden_layers}, hidden {c.hidden_size}, experts {c.num_local_experts} "
        f"(top-{c.num_experts_per_tok}, width {c.intermediate_size}), heads {c.num_attention_heads}/"
        f"{c.num_key_value_heads}x{c.head_dim}, vocab {c.vocab_size}, window {c.sliding_window}"
    )
    print(f"  experts {'MXFP4' if reader.is_mxfp4 else 'unquantized'}; {len(reader.specs)} tensors, all shapes valid")
    print(
        f"  {total / 2**30:.2f} GiB on disk; with {n} worker(s): {expert_bytes / n / 2**30:.2f} GiB of experts "
        f"+ {(total - expert_bytes) / 2**30:.2f} GiB shared weights each"
    )
    return 0
