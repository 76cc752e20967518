"""ModelConfig: every spelling found in the wild, the published shapes, clear errors."""

from __future__ import annotations

import json

import pytest

from gptoss_ray.config import PRESETS, ModelConfig
from gptoss_ray.errors import ConfigError

# openai/gpt-oss-120b's config.json as published (abridged to the fields we read).
HUB_120B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_size": 2880, "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 18, "max_position_embeddings": 131072,
    "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4, "num_hidden_layers": 36,
    "num_key_value_heads": 8, "num_local_experts": 128, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
    "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000, "sliding_window": 128, "swiglu_limit": 7.0, "tie_word_embeddings": False,
    "vocab_size": 201088,
}


def test_published_120b_config_reads_to_the_preset():
    c = ModelConfig.from_dict(HUB_120B)
    assert c == PRESETS["gpt-oss-120b"].model_copy(update={"quantization_config": c.quantization_config})
    assert (c.num_hidden_layers, c.num_local_experts, c.num_experts_per_tok) == (36, 128, 4)
    assert c.rope_scaling.factor == 32 and c.rope_scaling.original_max_position_embeddings == 4096
    assert c.layer_types[:2] == ("sliding_attention", "full_attention") and c.is_mxfp4
    # ~117B parameters, as published
    assert 115e9 < c.num_params() < 119e9
    assert 20e9 < PRESETS["gpt-oss-20b"].num_params() < 22e9


def test_newer_spellings_rope_parameters_and_defaults():
    d = dict(HUB_120B)
    rope = d.pop("rope_scaling") | {"rope_theta": 150000.0}
    d.pop("rope_theta")
    d.pop("experts_per_token")
    d.pop("layer_types")
    d["rope_parameters"] = rope
    c = ModelConfig.from_dict(d)
    assert c.rope_theta == 150000.0 and c.rope_scaling.beta_fast == 32
    assert c.layer_types == ("sliding_attention", "full_attention") * 18  # default alternation


def test_experts_per_token_alone():
    d = dict(HUB_120B)
    d.pop("num_experts_per_tok")
    d["experts_per_token"] = 2
    assert ModelConfig.from_dict(d).num_experts_per_tok == 2


@pytest.mark.parametrize(
    "change, field",
    [
        ({"hidden_size": None}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"layer_types": ["full_attention"]}, "layer_types"),
        ({"layer_types": ["global"] * 36}, "layer_types"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": -2}}, "rope_scaling.factor"),
    ],
)
def test_invalid_field_is_named_with_the_file(tmp_path, change, field):
    d = HUB_120B | change
    if change.get("hidden_size", 1) is None:
        d.pop("hidden_size")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_json_file(path)
    assert field.split(".")[0] in str(e.value) and str(path) in str(e.value)


def test_not_json(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_json_file(path)


def test_hf_dict_round_trip():
    for preset in PRESETS.values():
        assert ModelConfig.from_dict(preset.to_hf_dict()) == preset


def test_max_model_len_beyond_the_models_context_is_refused_unless_allowed(monkeypatch):
    from gptoss_ray.config import ALLOW_LONG_MAX_MODEL_LEN_ENV, EngineConfig, check_max_model_len
    from gptoss_ray.errors import ConfigError

    monkeypatch.delenv(ALLOW_LONG_MAX_MODEL_LEN_ENV, raising=False)
    model = PRESETS["tiny"].model_copy(update={"max_position_embeddings": 4096})
    check_max_model_len(EngineConfig(max_model_len=4096), model)
    check_max_model_len(EngineConfig(), model)
    with pytest.raises(ConfigError, match="exceeds the model's context of 4096"):
        check_max_model_len(EngineConfig(max_model_len=4097), model)
    check_max_model_len(EngineConfig(max_model_len=8192, allow_long_max_model_len=True), model)
    monkeypatch.setenv(ALLOW_LONG_MAX_MODEL_LEN_ENV, "1")
    check_max_model_len(EngineConfig(max_model_len=8192), model)
