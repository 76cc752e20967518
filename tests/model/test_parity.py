"""The model against an independent implementation: transformers' GptOssForCausalLM,
loaded from the same checkpoint files (it dequantizes the MXFP4 experts itself)."""

from __future__ import annotations

import pytest
import torch

from gptoss_ray.model.attention import allocate_kv_cache, contiguous_metadata
from gptoss_ray.model.loader import load_model

PROMPT_LEN = 21  # longer than the tiny presets' sliding window (8)
NEW_TOKENS = 12
BLOCK = 4  # small blocks so sequences cross many block boundaries


def _prompt(seed: int, n: int = PROMPT_LEN) -> torch.Tensor:
    return torch.randint(0, 200_000, (n,), generator=torch.Generator().manual_seed(seed))


def _cache(model, max_blocks: int, batch: int = 1):
    n = max_blocks * batch
    return allocate_kv_cache(model.config, {"full_attention": n, "sliding_attention": n}, BLOCK, model.dtype)


def greedy_incremental(model, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    """Prefill once, then decode one token at a time through the paged cache."""
    max_blocks = (len(prompt) + steps) // BLOCK + 1
    kv = _cache(model, max_blocks)
    tokens, logprobs = [], []
    ids, pos = prompt, torch.arange(len(prompt))
    for _ in range(steps):
        ctx = int(pos[-1]) + 1
        meta = contiguous_metadata([len(ids)], [ctx], BLOCK, max_blocks)
        logits = model.compute_logits(model(ids, pos, meta, kv)[-1:])[0]
        lp = torch.log_softmax(logits, dim=-1)
        tok = int(lp.argmax())
        tokens.append(tok)
        logprobs.append(float(lp[tok]))
        ids, pos = torch.tensor([tok]), torch.tensor([ctx])
    return tokens, logprobs


def full_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """All positions' logits from one forward over the whole sequence, fresh cache."""
    max_blocks = len(ids) // BLOCK + 1
    meta = contiguous_metadata([len(ids)], [len(ids)], BLOCK, max_blocks)
    return model.compute_logits(model(ids, torch.arange(len(ids)), meta, _cache(model, max_blocks)))


def hf_greedy(path, prompt: torch.Tensor, steps: int) -> tuple[list[int], list[float]]:
    from transformers import GptOssForCausalLM, Mxfp4Config

    hf = GptOssForCausalLM.from_pretrained(path, quantization_config=Mxfp4Config(dequantize=True), dtype=torch.float32)
    hf.eval()
    with torch.no_grad():
        out = hf.generate(
            prompt[None], max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [float(torch.log_softmax(l[0].float(), -1)[t]) for l, t in zip(out.logits, tokens)]
    return tokens, logprobs


@pytest.mark.parametrize("ckpt", ["tiny_odd_ckpt", "tiny_moe_ckpt"])
def test_greedy_tokens_and_logprobs_match_transformers(ckpt, request):
    path = request.getfixturevalue(ckpt)
    for seed in (1, 2):
        prompt = _prompt(seed)
        ours = greedy_incremental(load_model(path), prompt, NEW_TOKENS)
        ref = hf_greedy(path, prompt, NEW_TOKENS)
        assert ours[0] == ref[0]
        assert ours[1] == pytest.approx(ref[1], abs=1e-3)


def test_incremental_decode_equals_full_recompute(tiny_odd_ckpt):
    model = load_model(tiny_odd_ckpt)
    prompt = _prompt(3)
    tokens, logprobs = greedy_incremental(model, prompt, NEW_TOKENS)
    full = torch.log_softmax(full_logits(model, torch.cat([prompt, torch.tensor(tokens)])), dim=-1)
    for i, (tok, lp) in enumerate(zip(tokens, logprobs)):
        row = full[PROMPT_LEN - 1 + i]
        assert int(row.argmax()) == tok
        assert float(row[tok]) == pytest.approx(lp, abs=1e-5)


def test_batched_sequences_equal_single(tiny_ckpt):
    """Packing several sequences of different lengths into one forward changes nothing."""
    model = load_model(tiny_ckpt)
    prompts = [_prompt(s, n) for s, n in ((4, 3), (5, 17), (6, 9))]
    max_blocks = 17 // BLOCK + 1
    meta = contiguous_metadata([len(p) for p in prompts], [len(p) for p in prompts], BLOCK, max_blocks)
    ids = torch.cat(prompts)
    pos = torch.cat([torch.arange(len(p)) for p in prompts])
    batched = model.compute_logits(model(ids, pos, meta, _cache(model, max_blocks, batch=3)))
    start = 0
    for p in prompts:
        alone = full_logits(model, p)
        torch.testing.assert_close(batched[start : start + len(p)], alone, atol=1e-4, rtol=1e-4)
        start += len(p)


def test_bfloat16_tracks_float32(tiny_ckpt):
    """bf16 weights and activations: the same argmax on most positions, logprobs close."""
    ids = _prompt(7, 16)
    f32 = torch.log_softmax(full_logits(load_model(tiny_ckpt), ids), -1)
    bf16_model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    assert bf16_model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.bfloat16
    bf16 = torch.log_softmax(full_logits(bf16_model, ids), -1)
    agree = (f32.argmax(-1) == bf16.argmax(-1)).float().mean()
    assert agree >= 0.75
    top = f32.argmax(-1, keepdim=True)
    assert (f32.gather(-1, top) - bf16.gather(-1, top)).abs().max() < 0.25


def test_unquantized_experts_give_the_same_model(tiny_ckpt, tmp_path):
    """A fine-tuned checkpoint saved dequantized (gate_up_proj [E, H, 2I] in bf16, as
    transformers saves it, no quantization_config) loads and computes the same logits."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from gptoss_kernels.mxfp4 import dequantize_mxfp4

    out = tmp_path / "dequantized"
    out.mkdir()
    config = json.loads((tiny_ckpt / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    tensors = {}
    for f in sorted(tiny_ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    for name in [n for n in tensors if n.endswith("_blocks")]:
        base = name.removesuffix("_blocks")
        dense = dequantize_mxfp4(tensors.pop(name), tensors.pop(f"{base}_scales"), torch.bfloat16)
        tensors[base] = dense.transpose(1, 2).contiguous()  # [E, in, out]
    save_file(tensors, str(out / "model.safetensors"))
    shutil.copy(tiny_ckpt / "generation_config.json", out)
    ids = _prompt(8, 12)
    quantized = load_model(tiny_ckpt)
    plain = load_model(out)
    assert not hasattr(plain.model.layers[0].mlp.experts, "gate_up_blocks")
    torch.testing.assert_close(full_logits(plain, ids), full_logits(quantized, ids), atol=1e-4, rtol=1e-4)


def test_dequantized_experts_compute_the_same_model(tiny_odd_ckpt):
    """dequantize_experts (memory for speed on CPU) unpacks to exactly the values the
    packed path computes with."""
    ids = _prompt(9, 14)
    packed = load_model(tiny_odd_ckpt)
    unpacked = load_model(tiny_odd_ckpt)
    unpacked.dequantize_experts()
    experts = unpacked.model.layers[0].mlp.experts
    assert not hasattr(experts, "gate_up_blocks") and experts.gate_up_weight.dtype == torch.float32
    torch.testing.assert_close(full_logits(unpacked, ids), full_logits(packed, ids), atol=1e-5, rtol=1e-5)
