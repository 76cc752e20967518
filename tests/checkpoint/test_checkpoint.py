"""Checkpoints: the HF layout we write, what the reader reads, and one clear error for
each way a checkpoint can be bad."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptoss_ray.checkpoint import CheckpointReader, locate, write_checkpoint
from gptoss_ray.config import PRESETS, ModelConfig
from gptoss_ray.errors import CheckpointError
from gptoss_ray.model.loader import load_model


def test_written_layout_is_the_hf_layout(tiny_ckpt):
    index = json.loads((tiny_ckpt / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    config = json.loads((tiny_ckpt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "mxfp4"
    assert config["model_type"] == "gpt_oss" and config["architectures"] == ["GptOssForCausalLM"]
    names = set(index["weight_map"])
    p = "model.layers.1.mlp.experts."
    assert {p + s for s in ("gate_up_proj_blocks", "gate_up_proj_scales", "gate_up_proj_bias",
                            "down_proj_blocks", "down_proj_scales", "down_proj_bias")} <= names
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.sinks"} <= names
    r = CheckpointReader(tiny_ckpt)
    assert r.get(p + "gate_up_proj_blocks").dtype == torch.uint8
    assert tuple(r.get(p + "gate_up_proj_blocks").shape) == (8, 128, 2, 16)
    assert r.get("model.norm.weight").dtype == torch.bfloat16


def test_writing_is_deterministic(tmp_path):
    a = write_checkpoint(PRESETS["tiny"], tmp_path / "a", seed=3)
    b = write_checkpoint(PRESETS["tiny"], tmp_path / "b", seed=3)
    for f in a.glob("*.safetensors"):
        assert f.read_bytes() == (b / f.name).read_bytes()


def test_expert_slice_equals_rows_of_the_whole(tiny_ckpt):
    r = CheckpointReader(tiny_ckpt)
    name = "model.layers.0.mlp.experts.down_proj_scales"
    assert torch.equal(r.get_experts(name, 3, 6), r.get(name)[3:6])


def _tensor_byte_range(path: Path, name: str) -> tuple[int, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    begin, end = header[name]["data_offsets"]
    return 8 + n + begin, 8 + n + end


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page-cache measurement uses Linux mincore")
def test_loading_a_subset_of_experts_reads_only_those_bytes(tmp_path):
    """Measured in the page cache: drop the file from it, read experts 2..3 of 8 of one
    tensor, and see which of that tensor's pages came in (readahead off for the
    reader's mapping, so the kernel reads only the pages touched)."""
    from support.pagecache import PAGE, drop_from_cache, no_readahead, resident_ranges

    base = PRESETS["tiny"].to_hf_dict() | {"hidden_size": 256, "intermediate_size": 256}
    ckpt = write_checkpoint(ModelConfig.from_dict(base), tmp_path / "ck", num_shards=1)
    shard = str(ckpt / "model-00001-of-00001.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj_blocks"
    start, end = _tensor_byte_range(Path(shard), name)
    per_expert = (end - start) // 8
    drop_from_cache(shard)
    reader = CheckpointReader(ckpt)
    assert no_readahead(shard) >= 1
    experts = reader.get_experts(name, 2, 4).clone()  # clone: touch every byte
    assert experts.numel() == 2 * per_expert
    in_tensor = [(max(s, start), min(e, end)) for s, e in resident_ranges(shard) if e > start and s < end]
    read_bytes = sum(e - s for s, e in in_tensor)
    assert 2 * per_expert <= read_bytes <= 2 * per_expert + 3 * PAGE, in_tensor
    assert read_bytes < (end - start) / 3  # the other six experts stayed on disk


def test_resident_weights_stay_under_1_1x_the_checkpoint(tiny_ckpt):
    """Experts stay packed in memory: bf16 model bytes ~ bytes on disk."""
    model = load_model(tiny_ckpt, dtype=torch.bfloat16)
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    on_disk = sum(f.stat().st_size for f in tiny_ckpt.glob("*.safetensors"))
    assert total < 1.1 * on_disk, (total, on_disk)
    assert model.model.layers[0].mlp.experts.gate_up_blocks.dtype == torch.uint8


def test_expert_subset_model_holds_only_its_experts(tiny_ckpt):
    full = load_model(tiny_ckpt)
    part = load_model(tiny_ckpt, experts=range(2, 5))
    a, b = full.model.layers[1].mlp.experts, part.model.layers[1].mlp.experts
    assert b.gate_up_blocks.shape[0] == 3 and (b.start, b.end) == (2, 5)
    assert torch.equal(a.down_blocks[2:5], b.down_blocks)
    assert torch.equal(a.gate_up_bias[2:5], b.gate_up_bias)


# --- bad input: one clear line, no traceback ------------------------------------------


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    import os

    env = os.environ | (env_extra or {})
    return subprocess.run([sys.executable, "-m", "gptoss_ray.cli", *args], capture_output=True, text=True, env=env, timeout=120)


def _assert_one_clear_line(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture
def broken_copy(tiny_ckpt, tmp_path):
    import shutil

    return Path(shutil.copytree(tiny_ckpt, tmp_path / "copy"))


def test_missing_config_json(broken_copy):
    (broken_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        locate(broken_copy)
    _assert_one_clear_line(_cli("inspect", str(broken_copy)), "config.json")


def test_invalid_config_field_names_field_and_file(broken_copy):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["hidden_size"] = "wide"
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    _assert_one_clear_line(_cli("inspect", str(broken_copy)), "hidden_size", "config.json")


def test_tensor_with_wrong_shape(broken_copy):
    cfg = json.loads((broken_copy / "config.json").read_text())
    cfg["num_attention_heads"] = 8  # q_proj on disk is for 4 heads
    (broken_copy / "config.json").write_text(json.dumps(cfg))
    _assert_one_clear_line(_cli("inspect", str(broken_copy)), "q_proj.weight", "shape")


def test_truncated_safetensors_file(broken_copy):
    shard = broken_copy / "model-00003-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _assert_one_clear_line(_cli("inspect", str(broken_copy)), "model-00003-of-00003.safetensors")


def test_missing_shard(broken_copy):
    (broken_copy / "model-00002-of-00003.safetensors").unlink()
    _assert_one_clear_line(_cli("inspect", str(broken_copy)), "model-00002-of-00003.safetensors", "missing")


def test_hub_id_while_offline():
    proc = _cli("inspect", "openai/gpt-oss-120b", env_extra={"HF_HUB_OFFLINE": "1"})
    _assert_one_clear_line(proc, "openai/gpt-oss-120b", "HF_HUB_OFFLINE", "download")


def test_make_checkpoint_cli_with_overrides(tmp_path):
    out = tmp_path / "ck"
    proc = _cli("make-checkpoint", "--preset", "tiny", "--layers", "3", "--experts", "5", "--shards", "2", str(out))
    assert proc.returncode == 0, proc.stderr
    r = CheckpointReader(out)
    assert r.config.num_hidden_layers == 3 and r.config.num_local_experts == 5
    assert r.config.layer_types == ("sliding_attention", "full_attention", "sliding_attention")
    assert len(list(out.glob("*.safetensors"))) == 2
    bad = _cli("make-checkpoint", "--hidden-size", "100", str(tmp_path / "bad"))
    _assert_one_clear_line(bad, "hidden_size", "multiple of 32")
