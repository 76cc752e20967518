"""The one table of tensor names in the Hugging Face gpt-oss layout (openai/gpt-oss-120b).

Every reader and writer goes through `tensor_specs`, so a renamed or reshaped tensor is
a one-line change. Legend: V vocab, H hidden, E experts, I expert width, Q = heads x
head_dim, KV = kv heads x head_dim, G = (input dim) / 32 MXFP4 groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from gptoss_ray.config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str  # full name in the safetensors files
    shape: tuple[int, ...]
    kind: str  # "float" (bf16 on disk), "mxfp4_blocks", "mxfp4_scales" (uint8)
    is_expert: bool = False  # dim 0 indexes experts: workers read only their slice


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}"


def tensor_specs(config: ModelConfig, mxfp4: bool | None = None) -> list[TensorSpec]:
    """Every tensor of a checkpoint of this shape. `mxfp4=False` gives the dequantized
    layout (`gate_up_proj` [E, H, 2I], `down_proj` [E, I, H], as transformers saves it)."""
    mxfp4 = config.is_mxfp4 if mxfp4 is None else mxfp4
    c = config
    h, i, e = c.hidden_size, c.intermediate_size, c.num_local_experts
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    specs = [TensorSpec("model.embed_tokens.weight", (c.vocab_size, h), "float")]
    for layer in range(c.num_hidden_layers):
        p = layer_prefix(layer)
        specs += [
            TensorSpec(f"{p}.input_layernorm.weight", (h,), "float"),
            TensorSpec(f"{p}.post_attention_layernorm.weight", (h,), "float"),
            TensorSpec(f"{p}.self_attn.q_proj.weight", (q, h), "float"),
            TensorSpec(f"{p}.self_attn.q_proj.bias", (q,), "float"),
            TensorSpec(f"{p}.self_attn.k_proj.weight", (kv, h), "float"),
            TensorSpec(f"{p}.self_attn.k_proj.bias", (kv,), "float"),
            TensorSpec(f"{p}.self_attn.v_proj.weight", (kv, h), "float"),
            TensorSpec(f"{p}.self_attn.v_proj.bias", (kv,), "float"),
            TensorSpec(f"{p}.self_attn.o_proj.weight", (h, q), "float"),
            TensorSpec(f"{p}.self_attn.o_proj.bias", (h,), "float"),
            TensorSpec(f"{p}.self_attn.sinks", (c.num_attention_heads,), "float"),
            TensorSpec(f"{p}.mlp.router.weight", (e, h), "float"),
            TensorSpec(f"{p}.mlp.router.bias", (e,), "float"),
            TensorSpec(f"{p}.mlp.experts.gate_up_proj_bias", (e, 2 * i), "float", True),
            TensorSpec(f"{p}.mlp.experts.down_proj_bias", (e, h), "float", True),
        ]
        x = f"{p}.mlp.experts"
        if mxfp4:
            specs += [
                TensorSpec(f"{x}.gate_up_proj_blocks", (e, 2 * i, h // 32, 16), "mxfp4_blocks", True),
                TensorSpec(f"{x}.gate_up_proj_scales", (e, 2 * i, h // 32), "mxfp4_scales", True),
                TensorSpec(f"{x}.down_proj_blocks", (e, h, i // 32, 16), "mxfp4_blocks", True),
                TensorSpec(f"{x}.down_proj_scales", (e, h, i // 32), "mxfp4_scales", True),
            ]
        else:
            specs += [
                TensorSpec(f"{x}.gate_up_proj", (e, h, 2 * i), "float", True),
                TensorSpec(f"{x}.down_proj", (e, i, h), "float", True),
            ]
    specs += [
        TensorSpec("model.norm.weight", (h,), "float"),
        TensorSpec("lm_head.weight", (c.vocab_size, h), "float"),
    ]
    return specs
