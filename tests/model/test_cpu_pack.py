"""The CPU fast paths of a bf16 model (oneDNN pre-packed linear layers; the decode experts
through the C kernel or the dense packed GEMMs) compute the same step as the plain model."""

from __future__ import annotations

import pytest
import torch

from gptoss_kernels import cpu_kernels, onednn
from gptoss_ray.model.attention import allocate_kv_cache, contiguous_metadata
from gptoss_ray.model.loader import load_model

pytestmark = pytest.mark.skipif(not onednn.bf16_packing_available(), reason="no oneDNN bf16 on this CPU")
BLOCK = 4


def _bf16_plain_experts(path):
    model = load_model(path, dtype=torch.bfloat16)
    model.dequantize_experts()  # float32 on CPU; the peer checkpoints ship plain bf16 experts instead
    for moe in model.moe_layers():
        for name in ("gate_up_weight", "down_weight"):
            setattr(moe.experts, name, getattr(moe.experts, name).to(torch.bfloat16))
    return model


def _decode_logits(model, batch: int) -> torch.Tensor:
    """Prefill `batch` 9-token prompts, then one decode step of all of them: its logits."""
    max_blocks = 4
    kv = allocate_kv_cache(model.config, {"full_attention": batch * max_blocks, "sliding_attention": batch * max_blocks},
                           BLOCK, model.dtype)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 200_000, (batch * 9,), generator=gen)
    model(ids, torch.arange(9).repeat(batch), contiguous_metadata([9] * batch, [9] * batch, BLOCK, max_blocks), kv)
    step = torch.randint(0, 200_000, (batch,), generator=gen)
    hidden = model(step, torch.full((batch,), 9), contiguous_metadata([1] * batch, [10] * batch, BLOCK, max_blocks), kv)
    return model.compute_logits(hidden)


def _choose_experts_path(experts: str, monkeypatch) -> None:
    """"c_kernel": the decode experts take gptoss_kernels.cpu_kernels (skipped where it does not
    build); anything else: the torch path the kernel would replace."""
    if experts != "c_kernel":
        monkeypatch.setattr(cpu_kernels, "moe_takes", lambda *a: False)
    elif cpu_kernels.library() is None:
        pytest.skip("the CPU MoE kernel does not build here (no AVX512-BF16 or no C compiler)")


@pytest.mark.parametrize("experts", ["c_kernel", "dense_gemms"])
def test_packed_bf16_model_tracks_float32_as_the_plain_one_does(tiny_ckpt, experts, monkeypatch):
    """bf16 rounds in another order on the packed path, so it is held to the float32 model:
    no further from it than the plain bf16 model is, and the same greedy tokens. The decode
    experts take the C kernel (gptoss_kernels.cpu_kernels) where it builds, else the dense GEMMs."""
    _choose_experts_path(experts, monkeypatch)
    exact = load_model(tiny_ckpt, dtype=torch.float32)
    exact.dequantize_experts()
    model = _bf16_plain_experts(tiny_ckpt)
    batch = 8  # 32 (token, expert) pairs over 8 experts: the dense expert path
    want = _decode_logits(exact, batch)
    plain = _decode_logits(model, batch)
    assert model.pack_for_cpu() == ["lm_head", "attention", "router", "experts"]
    assert all(moe.experts.use_decode_path(batch, moe.top_k) for moe in model.moe_layers())
    assert all(moe.experts._fused == (experts == "c_kernel") for moe in model.moe_layers())
    packed = _decode_logits(model, batch)
    plain_err, packed_err = (plain - want).abs().max(), (packed - want).abs().max()
    assert packed_err <= 1.5 * plain_err, (packed_err, plain_err)
    assert torch.equal(packed.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("experts", ["c_kernel", "grouped_pairs"])
def test_packed_float32_model_computes_the_same_step(tiny_ckpt, monkeypatch, experts):
    """Large float32 linear weights are packed too (the unembedding); this tiny model's are
    small, so the size floor is lowered to pack them all. Float32 experts take the C kernel
    on decode steps where it builds, else the grouped pairs path. The packed step equals the
    plain float32 one (the same sums, in another order)."""
    _choose_experts_path(experts, monkeypatch)
    exact = load_model(tiny_ckpt, dtype=torch.float32)
    exact.dequantize_experts()
    batch = 8
    want = _decode_logits(exact, batch)
    monkeypatch.setattr(onednn, "FLOAT32_MIN_ELEMENTS", 0)
    kernel = experts == "c_kernel"
    assert exact.pack_for_cpu() == ["lm_head", "attention", "router"] + ["experts"] * kernel
    assert exact.lm_head.packed is not None and exact.moe_layers()[0].experts.use_decode_path(batch, 4) == kernel
    torch.testing.assert_close(_decode_logits(exact, batch), want, atol=2e-5, rtol=2e-5)
