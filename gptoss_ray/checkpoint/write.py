"""Write deterministic random-weight gpt-oss checkpoints in the exact Hugging Face layout.

These are the demo model and the model of every test: several safetensors shards, an
index json, config.json with `quantization_config` and MXFP4 experts, exactly like
openai/gpt-oss-120b, only small. Real weights are one `--model` flag away.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from gptoss_kernels.mxfp4 import quantize_mxfp4
from gptoss_ray.checkpoint.names import TensorSpec, tensor_specs
from gptoss_ray.config import HARMONY_CALL_ID, HARMONY_END_OF_TEXT_ID, HARMONY_RETURN_ID, PRESETS, ModelConfig
from gptoss_ray.errors import CheckpointError

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


def _random_tensor(spec: TensorSpec, gen: torch.Generator) -> torch.Tensor:
    """Scaled so activations stay O(1) through the layers and logits are not flat."""
    name, shape = spec.name, spec.shape
    x = torch.randn(shape, generator=gen)
    if name.endswith("layernorm.weight") or name == "model.norm.weight":
        return 1.0 + 0.1 * x
    if name.endswith("sinks"):
        return x
    if name.endswith("bias"):
        return 0.1 * x
    if name == "model.embed_tokens.weight":
        return x
    fan_in = shape[-1]
    if name.endswith("router.weight"):
        return 2.0 * x / math.sqrt(fan_in)
    if name.endswith("gate_up_proj"):
        return 4.0 * x / math.sqrt(fan_in)  # large enough that the SwiGLU clamp at 7 bites
    return x / math.sqrt(fan_in)


def random_state_dict(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint, in the on-disk dtypes (bf16, and uint8 for MXFP4)."""
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for spec in tensor_specs(config):
        if spec.kind == "mxfp4_scales":
            continue  # written together with its blocks
        if spec.kind == "mxfp4_blocks":
            base = spec.name.removesuffix("_blocks")
            out_dim, in_dim = spec.shape[1], spec.shape[2] * 32
            dense = TensorSpec(base, (spec.shape[0], out_dim, in_dim), "float")
            blocks, scales = quantize_mxfp4(_random_tensor(dense, gen))
            tensors[f"{base}_blocks"], tensors[f"{base}_scales"] = blocks, scales
        else:
            tensors[spec.name] = _random_tensor(spec, gen).to(torch.bfloat16)
    return tensors


def _split_into_shards(tensors: dict[str, torch.Tensor], num_shards: int) -> list[dict[str, torch.Tensor]]:
    """Contiguous shards of whole units (embedding, each layer, final norm + head), so a
    layer's tensors are usually in one file and every file holds expert tensors."""
    units: list[dict[str, torch.Tensor]] = []
    for name, t in tensors.items():
        unit = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else name
        if name in ("model.norm.weight", "lm_head.weight"):
            unit = "final"
        if not units or units[-1]["__unit__"] != unit:
            units.append({"__unit__": unit})
        units[-1][name] = t
    num_shards = min(num_shards, len(units))
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(num_shards)]
    for k, unit in enumerate(units):
        unit.pop("__unit__")
        shards[k * num_shards // len(units)].update(unit)
    return shards


def write_checkpoint(config: ModelConfig, out_dir: str | Path, seed: int = 0, num_shards: int = 3) -> Path:
    """Write config.json, `num_shards` safetensors files and the index into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = random_state_dict(config, seed)
    shards = _split_into_shards(tensors, max(1, num_shards))
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        file_name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: t.contiguous() for n, t in shard.items()}, str(out / file_name), metadata={"format": "pt"})
        weight_map.update({name: file_name for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [HARMONY_RETURN_ID, HARMONY_END_OF_TEXT_ID, HARMONY_CALL_ID],
                    "pad_token_id": HARMONY_END_OF_TEXT_ID}, indent=2)
    )
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("GPTOSS_RAY_CACHE", Path.home() / ".cache" / "gptoss-ray"))


def default_demo_checkpoint() -> Path:
    """The built-in demo model (the `tiny` preset), written once into the cache directory.

    Written to a temporary directory first and renamed into place, so concurrent first
    runs (several Ray workers) never see a half-written checkpoint."""
    target = cache_dir() / "demo-tiny"
    if (target / INDEX_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-tiny-", dir=target.parent))
    try:
        write_checkpoint(PRESETS["tiny"], tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / INDEX_FILE).is_file():
        raise CheckpointError(f"could not write the demo checkpoint into {target}")
    return target


# --- `gptoss-ray make-checkpoint` ----------------------------------------------------------

_OVERRIDES = {
    "layers": "num_hidden_layers",
    "experts": "num_local_experts",
    "experts_per_token": "num_experts_per_tok",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "head_dim": "head_dim",
    "sliding_window": "sliding_window",
    "vocab_size": "vocab_size",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory to write (created if missing)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="shape to start from (default tiny)")
    for flag, field in _OVERRIDES.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=int, help=f"override {field}")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--shards", type=int, default=3, help="number of safetensors files (default 3)")


def run(args: argparse.Namespace) -> int:
    base = PRESETS[args.preset].to_hf_dict()
    overrides = {field: getattr(args, flag) for flag, field in _OVERRIDES.items() if getattr(args, flag) is not None}
    if "num_hidden_layers" in overrides:
        base.pop("layer_types")  # re-derive the alternation for the new depth
    vocab = overrides.get("vocab_size", base["vocab_size"])
    if vocab <= max(base["eos_token_id"], base["pad_token_id"]):  # a small vocabulary: keep the ids inside it
        base["eos_token_id"], base["pad_token_id"] = vocab - 2, vocab - 1
    config = ModelConfig.from_dict(base | overrides, source="make-checkpoint flags")
    if config.num_params() > 2e9:
        raise CheckpointError(f"{config.num_params() / 1e9:.0f}B random parameters is too large to write; use real weights")
    out = write_checkpoint(config, args.out_dir, seed=args.seed, num_shards=args.shards)
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {out} ({config.num_params() / 1e6:.1f}M params, {size / 2**20:.1f} MiB)")
    return 0
