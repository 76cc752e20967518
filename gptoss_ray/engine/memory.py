"""How many bytes a worker's KV cache gets: the explicit `kv_cache_memory_gb`, or vLLM's
`gpu_memory_utilization` (a fraction of the device's memory for weights, activations
and KV together).

vLLM measures the weights and a profiling forward pass after loading; the engine here
plans its KV pool before any worker exists (the block manager lives in the engine), so
the weights are counted from the checkpoint's headers (per worker: the shared tensors
at the serving dtype, plus this worker's share of the experts as stored, or unpacked to
float32 when `dequantize_experts` is on) and activations are a bound from the shapes.
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
    activations = activation_bytes(model, config, dtype)
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


def activation_bytes(model: ModelConfig, config: EngineConfig, dtype: str) -> int:
    """A bound on one step's transient tensors: sampling's [S, V] float32 copies, the
    prompt-logprob chunk, and the batch's hidden and expert activations."""
    width = torch.finfo(getattr(torch, dtype)).bits // 8
    v, t = model.vocab_size, config.max_num_batched_tokens
    sampling = 4 * v * (4 * config.max_num_seqs + 2 * PROMPT_LOGPROB_ROWS)
    hidden = width * t * (16 * model.hidden_size + 3 * model.num_experts_per_tok * model.intermediate_size)
    return sampling + hidden
