"""The gpt-oss transformer (single device; parallelism is applied after it is built).

TransformerBlock = AttentionBlock + MLPBlock, each owning its RMSNorm and residual, as in
openai/gpt-oss's reference. Legend: T tokens of the step (packed), H hidden, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptoss_ray.config import ModelConfig
from gptoss_ray.model.attention import Attention, AttentionMetadata
from gptoss_ray.model.linear import Linear
from gptoss_ray.model.moe import MoE
from gptoss_ray.model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's rms_norm upcasts to float32 inside and rounds once on the way out (the
        # same arithmetic as x.float() * rsqrt(mean(x^2) + eps) * weight, then .to(dtype));
        # on CUDA it is one fused kernel instead of eight.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, experts: range, mxfp4: bool, dtype, device):
        super().__init__()
        eps, h = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = RMSNorm(h, eps, dtype, device)
        self.self_attn = Attention(config, config.layer_types[layer], dtype, device)
        self.post_attention_layernorm = RMSNorm(h, eps, dtype, device)
        self.mlp = MoE(config, experts, mxfp4, dtype, device)

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], attn: AttentionMetadata, kv_cache) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, attn, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x), attn.valid_tokens)


class GptOssModel(nn.Module):
    """Parameter names follow the Hugging Face layout (`model.layers.0.self_attn.q_proj`...)
    so that loading is one pass over the checkpoint's name table."""

    def __init__(
        self,
        config: ModelConfig,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        experts: range | None = None,
        mxfp4: bool | None = None,
    ):
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.expert_range = experts if experts is not None else range(config.num_local_experts)
        mxfp4 = config.is_mxfp4 if mxfp4 is None else mxfp4
        h = config.hidden_size
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, h, dtype=dtype, device=device)
        self.model.layers = nn.ModuleList(
            TransformerBlock(config, i, self.expert_range, mxfp4, dtype, device) for i in range(config.num_hidden_layers)
        )
        self.model.norm = RMSNorm(h, config.rms_norm_eps, dtype, device)
        self.lm_head = Linear(h, config.vocab_size, bias=False, dtype=dtype, device=device)
        # one cos/sin table for all layers (they share head_dim, theta and scaling)
        self.rope = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling,
                                    config.max_position_embeddings)

    def finish_loading(self) -> None:
        """Derive the tensors that are not in the checkpoint, once the weights are in."""
        for layer in self.model.layers:
            layer.self_attn.finish_loading()
            layer.mlp.finish_loading()

    def moe_layers(self) -> list[MoE]:
        return [layer.mlp for layer in self.model.layers]

    def dequantize_experts(self) -> None:
        """See LocalExperts.dequantize_: memory for speed where no MXFP4 kernel runs."""
        for moe in self.moe_layers():
            moe.experts.dequantize_()

    def reserve_positions(self, n: int) -> None:
        """Rope rows for positions up to n (an allowed max_model_len past the model's own limit)."""
        self.rope.max_positions = max(self.rope.max_positions, n)

    def pack_for_cpu(self) -> list[str]:
        """On a CPU with bf16 matmul units, pre-pack the bf16 weights a decode step reads in
        oneDNN's layout (see gptoss_ray.model.linear and gptoss_kernels.onednn): every linear
        layer (the unembedding above all), and the experts' gate_up and down for the dense
        decode path. Returns what was packed."""
        packed = []
        linears = {"lm_head": [self.lm_head]}
        for layer in self.model.layers:
            linears.setdefault("attention", []).extend([layer.self_attn.qkv_proj, layer.self_attn.o_proj])
            linears.setdefault("router", []).append(layer.mlp.router)
        for name, modules in linears.items():
            if any([m.pack_for_cpu() for m in modules]):
                packed.append(name)
        if any([moe.experts.pack_for_cpu() for moe in self.moe_layers()]):
            packed.append("experts")
        return packed

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """input_ids, positions [T] -> final hidden states [T, H] (normed)."""
        x = self.model.embed_tokens(input_ids)
        rope = self.rope.lookup(positions, x.dtype)  # once per step, shared by every layer
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, rope, attn, kv_cache)
        return self.model.norm(x)

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """[N, H] -> [N, V] logits, in float32 or (float32=False) the model's dtype, for a
        caller that upcasts only where it needs to (the sampler: 13 MB less per step for 16
        rows of a 201k vocabulary when it only takes the argmax)."""
        logits = self.lm_head(hidden)
        return logits.float() if float32 else logits
