"""The KV budget: explicit GiB, or gpu_memory_utilization (vLLM's share of device memory
for weights + activations + KV), and which wins."""

from __future__ import annotations

import pytest
import torch

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine import memory
from gptoss_ray.engine.engine import build_worker_config
from gptoss_ray.errors import ConfigError
from gptoss_ray.model.loader import load_model

GiB = 2**30


def _config(ckpt, **kw) -> EngineConfig:
    return EngineConfig(model=str(ckpt), device="cpu", dtype="float32", max_num_seqs=8, **kw)


def test_weight_count_matches_the_loaded_model(tiny_ckpt):
    model = load_model(tiny_ckpt)
    loaded = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert memory.weight_bytes(tiny_ckpt, "float32", 1, False) == pytest.approx(loaded, rel=0.01)
    model.dequantize_experts()
    unpacked = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert memory.weight_bytes(tiny_ckpt, "float32", 1, True) == pytest.approx(unpacked, rel=0.01)
    # experts split across workers, shared weights on each
    assert memory.weight_bytes(tiny_ckpt, "float32", 2, False) < memory.weight_bytes(tiny_ckpt, "float32", 1, False)


def test_utilization_gives_kv_what_weights_and_activations_leave(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(memory, "device_memory", lambda device, ep: (4 * GiB, 3 * GiB))
    config = _config(tiny_ckpt, gpu_memory_utilization=0.5)
    model = build_worker_config(config)[1]
    weights = memory.weight_bytes(tiny_ckpt, "float32", 1, False) + memory.packed_copy_bytes(model, config, "cpu",
                                                                                             "float32")
    activations = memory.activation_bytes(model, config, "float32")
    kv = memory.kv_cache_bytes(config, tiny_ckpt, build_worker_config(config)[1], "cpu", "float32")
    assert kv == int(2 * GiB - weights - activations)
    # the same pool as an explicit budget of that many bytes
    by_util = build_worker_config(config)[0].num_blocks
    assert by_util == build_worker_config(_config(tiny_ckpt, kv_cache_memory_gb=kv / GiB))[0].num_blocks
    assert build_worker_config(_config(tiny_ckpt, gpu_memory_utilization=0.7))[0].num_blocks > by_util


@pytest.mark.parametrize("util,message", [(0.9, "only 3.00 of 4.00 GiB are free"), (0.01, "already use")])
def test_utilization_that_cannot_work_is_refused(tiny_ckpt, monkeypatch, util, message):
    monkeypatch.setattr(memory, "device_memory", lambda device, ep: (4 * GiB, 3 * GiB))
    with pytest.raises(ConfigError, match=message):
        build_worker_config(_config(tiny_ckpt, gpu_memory_utilization=util))


def test_budgets_exclude_each_other_and_blocks_override(tiny_ckpt):
    with pytest.raises(ValueError, match="not both"):
        _config(tiny_ckpt, gpu_memory_utilization=0.5, kv_cache_memory_gb=1)
    assert build_worker_config(_config(tiny_ckpt, gpu_memory_utilization=0.5, num_kv_blocks=7))[0].num_blocks == 7
    assert build_worker_config(_config(tiny_ckpt))[0].num_blocks == \
        build_worker_config(_config(tiny_ckpt, kv_cache_memory_gb=memory.DEFAULT_KV_CACHE_GB))[0].num_blocks


def test_cpu_memory_is_the_hosts_shared_by_the_workers():
    total1, free1 = memory.device_memory("cpu", 1)
    total2, _ = memory.device_memory("cpu", 2)
    assert 0 < free1 <= total1 and total2 == total1 // 2
    if torch.cuda.is_available():
        assert memory.device_memory("cuda", 1)[0] == torch.cuda.mem_get_info()[1]


def test_the_planner_counts_the_packed_copies_the_worker_makes(tiny_ckpt, monkeypatch):
    """On CPU the oneDNN-packed copies sit beside the plain weights: the planner's count equals
    what packing a loaded model adds (float32 with the size floor lowered so every linear layer
    packs; the tiny checkpoint's experts are MXFP4, so they get no copy)."""
    from gptoss_kernels import onednn

    monkeypatch.setattr(onednn, "FLOAT32_MIN_ELEMENTS", 0)
    model = load_model(tiny_ckpt)
    model.dequantize_experts()
    model.pack_for_cpu()
    linears = [model.lm_head] + [m for layer in model.model.layers
                                 for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.router)]
    added = sum(m.weight.numel() * m.weight.element_size() for m in linears if m.packed is not None)
    config = _config(tiny_ckpt)
    assert added > 0
    assert memory.packed_copy_bytes(build_worker_config(config)[1], config, "cpu", "float32") == added
    assert memory.packed_copy_bytes(build_worker_config(config)[1], config, "cuda", "float32") == 0


def test_cuda_graphs_reserve_their_pool_out_of_the_kv_budget(tiny_ckpt, monkeypatch):
    """With graphs (CUDA, ep_size 1, not enforce_eager) the KV pool is smaller by the graph pool's
    bound; without them it is not."""
    monkeypatch.setattr(memory, "device_memory", lambda device, ep: (4 * GiB, 3 * GiB))
    model = build_worker_config(_config(tiny_ckpt))[1]

    def kv(**kw):
        return memory.kv_cache_bytes(_config(tiny_ckpt, gpu_memory_utilization=0.5, **kw), tiny_ckpt, model, "cuda",
                                     "float32")

    pool = memory.graph_pool_bytes(model, _config(tiny_ckpt), "cuda", "float32")
    assert pool > 0
    assert kv(enforce_eager=True) - kv() == pool
    assert kv(static_decode=False) == kv(enforce_eager=True)
    assert memory.graph_pool_bytes(model, _config(tiny_ckpt, cuda_graph_sizes=[1, 2]), "cuda", "float32") < pool
    assert memory.graph_pool_bytes(model, _config(tiny_ckpt), "cpu", "float32") == 0
