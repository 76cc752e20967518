"""Configuration, in two tiers (STYLE.md #3).

`ModelConfig` is pydantic: it is read from a checkpoint's config.json, written by users
and tools in several spellings, and must fail with one clear error naming the field and
the file. Everything inside the engine and model receives plain values taken from it.

Key spellings found in the wild, all accepted:
- `rope_scaling` (older transformers, openai's own config.json) or `rope_parameters`
  (transformers >= 4.56), with `rope_theta` at top level or inside either dict;
- `num_experts_per_tok` or `experts_per_token`; `num_local_experts` or `num_experts`;
- `layer_types`, or its default alternation (even layers sliding, odd layers full).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptoss_ray.errors import ConfigError

ALLOW_LONG_MAX_MODEL_LEN_ENV = "GPTOSS_RAY_ALLOW_LONG_MAX_MODEL_LEN"

# The layer kinds, as config.json spells them; also the keys of the KV pools, block tables
# and attention metadata per kind (engine/plan.py, model/attention.py).
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"
LAYER_TYPES = (FULL_ATTENTION, SLIDING_ATTENTION)
LayerType = Literal["sliding_attention", "full_attention"]


class YarnScaling(BaseModel):
    """YaRN RoPE scaling (Peng et al. 2023, https://arxiv.org/abs/2309.00071)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    rope_type: Literal["yarn"] = "yarn"
    factor: float = Field(32.0, gt=0, description="Context extension factor.")
    beta_fast: float = Field(32.0, description="Rotations above which frequencies are kept.")
    beta_slow: float = Field(1.0, description="Rotations below which frequencies are interpolated.")
    original_max_position_embeddings: int = Field(4096, gt=0)
    truncate: bool = Field(
        False, description="Round the correction range to whole dims (gpt-oss does not)."
    )


class QuantizationConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    quant_method: Literal["mxfp4"] = "mxfp4"
    modules_to_not_convert: list[str] = Field(default_factory=list)


class ModelConfig(BaseModel):
    """The shape of a gpt-oss model, as in its Hugging Face config.json."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)

    num_hidden_layers: int = Field(gt=0)
    num_local_experts: int = Field(gt=0, description="Experts per MoE layer.")
    num_experts_per_tok: int = Field(4, gt=0, description="Experts each token is routed to.")
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0, description="Expert MLP width.")
    head_dim: int = Field(64, gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    sliding_window: int = Field(128, gt=0)
    rms_norm_eps: float = Field(1e-5, gt=0)
    rope_theta: float = Field(150000.0, gt=0)
    rope_scaling: YarnScaling | None = None
    max_position_embeddings: int = Field(131072, gt=0)
    layer_types: tuple[LayerType, ...] = ()
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    quantization_config: QuantizationConfig | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = True

    @model_validator(mode="before")
    @classmethod
    def _normalize_spellings(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "num_experts_per_tok" not in data and "experts_per_token" in data:
            data["num_experts_per_tok"] = data["experts_per_token"]
        if "num_local_experts" not in data and "num_experts" in data:
            data["num_local_experts"] = data["num_experts"]
        rope = data.get("rope_scaling") or data.get("rope_parameters")
        if isinstance(rope, dict):
            rope = dict(rope)
            if "rope_theta" in rope and "rope_theta" not in data:
                data["rope_theta"] = rope["rope_theta"]
            rope_type = rope.get("rope_type", rope.get("type", "yarn"))
            data["rope_scaling"] = None if rope_type == "default" else rope | {"rope_type": rope_type}
        data.pop("rope_parameters", None)
        if data.get("sliding_window") is None:
            data.pop("sliding_window", None)
        return data

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if not self.layer_types:
            # transformers' default: layer 0 sliding, layer 1 full, ...
            default = tuple(
                SLIDING_ATTENTION if i % 2 == 0 else FULL_ATTENTION
                for i in range(self.num_hidden_layers)
            )
            object.__setattr__(self, "layer_types", default)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError("num_experts_per_tok exceeds num_local_experts")
        if self.quantization_config is not None:
            for size, name in ((self.hidden_size, "hidden_size"), (self.intermediate_size, "intermediate_size")):
                if size % 32:
                    raise ValueError(f"{name} must be a multiple of 32 for MXFP4 experts, got {size}")
        return self

    # --- derived values used across the code -------------------------------------------

    @property
    def is_mxfp4(self) -> bool:
        return self.quantization_config is not None

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_params(self) -> int:
        """Parameter count (weights and biases, experts unpacked)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + (q + 2 * kv) + q * h + h + self.num_attention_heads
        moe = e * h + e + e * (h * 2 * i + 2 * i + i * h + h)
        per_layer = attn + moe + 2 * h
        return self.num_hidden_layers * per_layer + 2 * self.vocab_size * h + h

    # --- files -------------------------------------------------------------------------

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: file not found (a gpt-oss checkpoint needs config.json)")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            field = ".".join(str(x) for x in err["loc"]) or "(config)"
            msg = err["msg"].removeprefix("Value error, ")
            raise ConfigError(f"{source}: field '{field}': {msg}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """config.json contents in the spelling of openai/gpt-oss-120b on the hub."""
        d: dict[str, Any] = {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "attention_bias": self.attention_bias,
            "attention_dropout": 0.0,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "experts_per_token": self.num_experts_per_tok,
            "num_experts_per_tok": self.num_experts_per_tok,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": list(self.layer_types),
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "num_local_experts": self.num_local_experts,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "sliding_window": self.sliding_window,
            "swiglu_limit": self.swiglu_limit,
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_cache": True,
            "vocab_size": self.vocab_size,
        }
        if self.rope_scaling is not None:
            d["rope_scaling"] = self.rope_scaling.model_dump()
        if self.quantization_config is not None:
            d["quantization_config"] = self.quantization_config.model_dump()
        return d


# o200k_harmony's special ids, one home (harmony/encoding.py checks the tokenizer agrees):
# <|return|> and <|call|> end an assistant turn; <|endoftext|> pads.
HARMONY_VOCAB_SIZE = 201088
HARMONY_RETURN_ID = 200002
HARMONY_CALL_ID = 200012
HARMONY_END_OF_TEXT_ID = 199999
HARMONY_STOP_TOKEN_IDS = (HARMONY_RETURN_ID, HARMONY_CALL_ID)

_MXFP4 = QuantizationConfig(modules_to_not_convert=["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"])
_YARN = YarnScaling()

_FULL_SIZE = dict(
    hidden_size=2880, intermediate_size=2880, head_dim=64, num_attention_heads=64,
    num_key_value_heads=8, vocab_size=HARMONY_VOCAB_SIZE, rope_scaling=_YARN,
    quantization_config=_MXFP4, eos_token_id=HARMONY_RETURN_ID, pad_token_id=HARMONY_END_OF_TEXT_ID,
)

# Presets: the two published shapes, and small shapes for demos and tests. The small
# ones keep the harmony vocabulary so that rendered prompts and parsed replies work.
PRESETS: dict[str, ModelConfig] = {
    "gpt-oss-120b": ModelConfig(num_hidden_layers=36, num_local_experts=128, **_FULL_SIZE),
    "gpt-oss-20b": ModelConfig(num_hidden_layers=24, num_local_experts=32, **_FULL_SIZE),
    # The demo / default test model: 2 layers (one sliding, one full), 8 experts.
    "tiny": ModelConfig(
        num_hidden_layers=2, num_local_experts=8, hidden_size=64, intermediate_size=64,
        head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        vocab_size=HARMONY_VOCAB_SIZE, rope_scaling=_YARN, quantization_config=_MXFP4,
        eos_token_id=HARMONY_RETURN_ID, pad_token_id=HARMONY_END_OF_TEXT_ID, max_position_embeddings=4096,
    ),
    # Odd shapes for parity: hidden != intermediate, heads x head_dim != hidden,
    # 6 experts (not a power of two, not divisible by 4), 3 layers.
    "tiny-odd": ModelConfig(
        num_hidden_layers=3, num_local_experts=6, hidden_size=96, intermediate_size=64,
        head_dim=8, num_attention_heads=6, num_key_value_heads=2, sliding_window=8,
        vocab_size=HARMONY_VOCAB_SIZE, rope_scaling=_YARN, quantization_config=_MXFP4,
        eos_token_id=HARMONY_RETURN_ID, pad_token_id=HARMONY_END_OF_TEXT_ID, max_position_embeddings=4096,
    ),
    # Expert-heavy for expert-parallel tests and benchmarks: 15 experts (not divisible by 2, 3, 4).
    "tiny-moe": ModelConfig(
        num_hidden_layers=2, num_local_experts=15, hidden_size=64, intermediate_size=128,
        head_dim=16, num_attention_heads=4, num_key_value_heads=2, sliding_window=8,
        vocab_size=HARMONY_VOCAB_SIZE, rope_scaling=_YARN, quantization_config=_MXFP4,
        eos_token_id=HARMONY_RETURN_ID, pad_token_id=HARMONY_END_OF_TEXT_ID, max_position_embeddings=4096,
    ),
}


class EngineConfig(BaseModel):
    """What a user sets for one model instance (CLI flags, Serve YAML args, Helm values).

    The engine turns it into plain values once, at construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str | None = Field(
        None, description="Checkpoint directory or Hugging Face hub id; None = the built-in tiny demo checkpoint."
    )
    dtype: Literal["float32", "bfloat16", "auto"] = Field(
        "auto", description="Activation and KV dtype; auto = bfloat16 on CUDA, float32 on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where workers run.")
    ep_size: int = Field(1, ge=1, le=64, description="Expert-parallel workers (GPUs) per model instance.")
    block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block.")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV blocks per worker for full-attention layers; None = sized from kv_cache_memory_gb."
    )
    kv_cache_memory_gb: float | None = Field(
        None, gt=0, description="KV cache budget per worker when num_kv_blocks is not set; None = 1 GiB unless "
        "gpu_memory_utilization sizes it (setting both is an error)."
    )
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="vLLM's knob: the fraction of each worker's device memory (GPU memory; on "
        "CPU the host's RAM shared by the ep_size workers) for weights, activations and KV cache together; the "
        "KV cache gets what the weights and an activation estimate leave. Refused when that much is not free "
        "at start. num_kv_blocks, when set, overrides it."
    )
    max_num_seqs: int = Field(256, ge=1, description="Most sequences running at once.")
    max_num_batched_tokens: int = Field(
        2048, ge=16, description="Token budget of one step (decodes plus prefill chunks)."
    )
    max_model_len: int | None = Field(
        None, ge=16, le=1 << 24,
        description="Longest prompt plus output; None = the model's max_position_embeddings. Longer than that is "
        f"refused at start-up unless allow_long_max_model_len (or ${ALLOW_LONG_MAX_MODEL_LEN_ENV}=1) is set.",
    )
    allow_long_max_model_len: bool = Field(
        False, description="Accept a max_model_len beyond the model's max_position_embeddings (positions the "
        "model was never trained on: its output there is likely garbage), as vLLM's VLLM_ALLOW_LONG_MAX_MODEL_LEN.",
    )
    enable_prefix_caching: bool = Field(True, description="Reuse KV blocks of shared prompt prefixes.")
    dequantize_experts: bool | None = Field(
        None,
        description="Unpack MXFP4 experts once at load, to float32 (8x their packed memory): several times "
        "faster on CPU, where no fused MXFP4 kernel runs. None (auto) unpacks on CPU when the unpacked experts "
        "take at most a quarter of the memory available, and never on GPUs, whose Triton kernel reads the "
        "packed weights.",
    )
    enforce_eager: bool = Field(
        False, description="vLLM's flag: no CUDA graphs; every step runs eagerly (on CPU there are none anyway)."
    )
    static_decode: bool | None = Field(
        None, description="Run pure-decode steps through the static decode runner (fixed buffers, batch padded to "
        "cuda_graph_sizes; CUDA graphs on CUDA unless enforce_eager). None = on CUDA with ep_size 1 unless "
        "enforce_eager, off on CPU (GPTOSS_STATIC_DECODE=1 turns it on there, for tests: same results, no graphs).",
    )
    cuda_graph_sizes: list[int] | None = Field(
        None, description="Decode batch sizes (buckets) the static runner pads to and captures; None = 1, 2, 4, 8, "
        "16, 24, ... every 8 up to max_num_seqs. A decode step larger than the largest runs eagerly.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement group strategy for the expert-parallel workers."
    )
    rendezvous_host: str = Field(
        "127.0.0.1", min_length=1,
        description="Where rank 0's torch.distributed rendezvous store listens. Loopback (the default) keeps it "
        "off the network: every rank of one instance runs on one node (PACK placement). An instance spread over "
        "nodes needs an address the other nodes reach: an IP of the node rank 0 lands on, or 'node' for its "
        "Ray node IP; its keys are then under a random per-group secret, and the port should be firewalled "
        "to the cluster (the store itself has no authentication).",
    )
    worker_num_cpus: float = Field(
        1.0, ge=0, description="Logical CPUs each worker actor asks Ray for (use a fraction on small CPU machines)."
    )
    step_timeout_s: float = Field(
        20.0, gt=0,
        description="A worker that does not answer a step in this time is declared dead (the first steps "
        "of a fresh worker group get longer, for kernel compilation).",
    )

    @field_validator("cuda_graph_sizes")
    @classmethod
    def _positive_sizes(cls, sizes: list[int] | None) -> list[int] | None:
        if sizes is not None and (not sizes or any(s < 1 or s > 4096 for s in sizes)):
            raise ValueError("cuda_graph_sizes must be a non-empty list of batch sizes in 1..4096")
        return sizes

    @model_validator(mode="after")
    def _one_kv_budget(self) -> EngineConfig:
        if self.kv_cache_memory_gb is not None and self.gpu_memory_utilization is not None:
            raise ValueError("set kv_cache_memory_gb (an explicit KV budget) or gpu_memory_utilization (a share of "
                             "device memory), not both")
        return self


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"


def worker_env(device: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """Environment variables for a process that will run a worker on `device`: on CPU,
    GLIBC_TUNABLES with the huge-page tunable added to whatever the environment already sets
    (why: engine/host_memory.py). Here, not there, because the serve layer starts such
    processes too (the replica of an ep_size 1 engine) and does not import the engine."""
    if device != "cpu":
        return {}
    current = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    if HUGE_PAGES_TUNABLE.split("=")[0] in current:  # the operator chose a value: keep it
        return {"GLIBC_TUNABLES": current}
    return {"GLIBC_TUNABLES": f"{current}:{HUGE_PAGES_TUNABLE}" if current else HUGE_PAGES_TUNABLE}



def check_max_model_len(config: EngineConfig, model: ModelConfig) -> None:
    """Refuse a max_model_len beyond the model's context, as vLLM does, unless allowed
    explicitly: a 999999999 once made a 200k-token prompt to a 4096-position model run
    for minutes before anything failed."""
    import os

    allowed = config.allow_long_max_model_len or os.environ.get(ALLOW_LONG_MAX_MODEL_LEN_ENV, "").lower() in (
        "1", "true", "yes")
    limit = model.max_position_embeddings
    if config.max_model_len is not None and config.max_model_len > limit and not allowed:
        raise ConfigError(
            f"max_model_len {config.max_model_len} exceeds the model's context of {limit} positions "
            f"(max_position_embeddings); lower it, or set {ALLOW_LONG_MAX_MODEL_LEN_ENV}=1 to allow it anyway")
