"""How many bytes a worker's KV cache gets: the explicit `kv_cache_memory_gb`, or vLLM's
`gpu_memory_utilization` (a fraction of the device's memory for weights, activations
and KV together).

vLLM measures the weights and a profiling forward pass after loading; the engine here
plans its KV pool before any worker exists (the block manager lives in the engine), so
the weights are counted from the checkpoint's headers (per worker: the shared tensors
at the serving dtype, plus this worker's share of the experts as stored, or unpacked to
float32 when `dequantize_experts` is on, plus on CPU the oneDNN-packed copies), and
activations are a bound from the shapes (plus, on CUDA, the decode graphs' memory pool).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gptoss_ray.config import EngineConfig, ModelConfig
from gptoss_ray.engine.sampler import PROMPT_LOGPROB_ROWS
from gptoss_ray.errors import ConfigError

DEFAULT_KV_CACHE_GB = 1.0


def kv_cache_bytes(config: EngineConfig, path: str | Path, model: ModelConfig, device: str, dtype: str) -> int:
    if config.gpu_memory_utilization is None:
        return int((config.kv_cache_memory_gb or DEFAULT_KV_CACHE_GB) * 2**30)
    util = config.gpu_memory_utilization
    total, free = device_memory(device, config.ep_size)
    requested = util * total
    if requested > free:
        raise ConfigError(
            f"gpu_memory_utilization {util} asks for {requested / 2**30:.2f} GiB per worker, but only "
            f"{free / 2**30:.2f} of {total / 2**30:.2f} GiB are free on {device}; lower it")
    weights = weight_bytes(path, dtype, config.ep_size, bool(config.dequantize_experts))
    weights += packed_copy_bytes(model, config, device, dtype)
    activations = activation_bytes(model, config, dtype) + graph_pool_bytes(model, config, device, dtype)
    kv = int(requested - weights - activations)
    if kv <= 0:
        raise ConfigError(
            f"gpu_memory_utilization {util} gives {requested / 2**30:.2f} GiB per worker, which the weights "
            f"({weights / 2**30:.2f} GiB) and activations ({activations / 2**30:.2f} GiB) already use; raise it")
    return kv


def device_memory(device: str, ep_size: int) -> tuple[int, int]:
    """(total, free) bytes for one worker: its GPU, or on CPU the host's RAM divided among
    the instance's workers (they share the host's memory)."""
    if device == "cuda":
        free, total = torch.cuda.mem_get_info()
        return int(total), int(free)
    meminfo = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, value = line.partition(":")
            meminfo[key] = int(value.split()[0]) * 1024
        total, free = meminfo["MemTotal"], meminfo["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):  # not Linux
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    return total // ep_size, free // ep_size


def weight_bytes(path: str | Path, dtype: str, ep_size: int, dequantized: bool) -> int:
    from gptoss_ray.checkpoint.read import CheckpointReader

    reader = CheckpointReader(path)
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    shared = experts = 0
    for name, spec in reader.specs.items():
        size, elem = reader.nbytes(name), reader.element_bytes(name)
        if spec.is_expert:
            # packed MXFP4 holds 2 values per byte and unpacks to float32 (8 bytes per byte)
            experts += size * (8 if elem == 1 else 4 // elem) if dequantized else size // elem * (1 if elem == 1 else width)
        else:
            shared += size // elem * width
    return shared + experts // ep_size


def _step_bytes(model: ModelConfig, tokens: int, width: int) -> int:
    """A step's hidden and expert activations at `tokens` tokens."""
    return width * tokens * (16 * model.hidden_size + 3 * model.num_experts_per_tok * model.intermediate_size)


def activation_bytes(model: ModelConfig, config: EngineConfig, dtype: str) -> int:
    """A bound on one step's transient tensors: sampling's [S, V] float32 copies, the
    prompt-logprob chunk, and the batch's hidden and expert activations."""
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    sampling = 4 * model.vocab_size * (4 * config.max_num_seqs + 2 * PROMPT_LOGPROB_ROWS)
    return sampling + _step_bytes(model, config.max_num_batched_tokens, width)


def graph_pool_bytes(model: ModelConfig, config: EngineConfig, device: str, dtype: str) -> int:
    """The static decode runner's CUDA graphs (engine/decode_runner.py) keep one memory pool for
    the engine's life, shared by every bucket (they replay one at a time): bounded by a step's
    activations at the largest bucket. Zero where no graph is captured (CPU, enforce_eager,
    static_decode off, expert parallelism: see Worker._use_static_decode)."""
    if device != "cuda" or config.enforce_eager or config.static_decode is False or config.ep_size > 1:
        return 0
    largest = min(max(config.cuda_graph_sizes or [config.max_num_seqs]), config.max_num_seqs)
    return _step_bytes(model, largest, torch.finfo(getattr(torch, dtype)).bits // 8)


def packed_copy_bytes(model: ModelConfig, config: EngineConfig, device: str, dtype: str) -> int:
    """On CPU the oneDNN-packed copies of linear weights live beside the plain ones
    (model/linear.py, LocalExperts.pack_for_cpu), by the same rule (onednn.packs): the
    unembedding, q/k/v and o, the router, and plain bf16 experts (this worker's share).
    MXFP4 experts are unpacked to float32 or kept packed: neither gets a copy."""
    if device != "cpu":
        return 0
    from gptoss_kernels import cpu_kernels, onednn

    t = getattr(torch, dtype)
    width = torch.finfo(t).bits // 8
    h, hd = model.hidden_size, model.head_dim
    q, kv = model.num_attention_heads * hd, model.num_key_value_heads * hd
    e, i = model.num_local_experts, model.intermediate_size
    per_layer = [(q + 2 * kv) * h, h * q, e * h]  # qkv_proj, o_proj, router
    copies = [model.vocab_size * h] + per_layer * model.num_hidden_layers
    total = sum(n for n in copies if onednn.packs(t, n))
    if (not model.is_mxfp4 and t == torch.bfloat16 and onednn.packs(t, e * 2 * i * h)
            and not cpu_kernels.moe_takes(t, h, i)):  # the C kernel reads the experts as they are
        experts = (e * 2 * i * h + h * (e * i + e)) * model.num_hidden_layers  # dense gate_up and down
        total += experts // config.ep_size
    return total * width
