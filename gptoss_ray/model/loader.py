"""Build a GptOssModel from a checkpoint through the one name table (checkpoint/names.py)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from gptoss_ray.checkpoint.read import CheckpointReader
from gptoss_ray.model.transformer import GptOssModel

logger = logging.getLogger(__name__)

# checkpoint name (after "model.layers.N.mlp.experts.") -> LocalExperts buffer, and
# whether the checkpoint stores it transposed relative to the buffer ([E, in, out]
# as transformers saves dequantized experts; our buffers are [E, out, in] like MXFP4).
_EXPERT_TENSORS = {
    "gate_up_proj_blocks": ("gate_up_blocks", False),
    "gate_up_proj_scales": ("gate_up_scales", False),
    "down_proj_blocks": ("down_blocks", False),
    "down_proj_scales": ("down_scales", False),
    "gate_up_proj_bias": ("gate_up_bias", False),
    "down_proj_bias": ("down_bias", False),
    "gate_up_proj": ("gate_up_weight", True),
    "down_proj": ("down_weight", True),
}

_QKV = re.compile(r"model\.layers\.(\d+)\.self_attn\.(q_proj|k_proj|v_proj)\.(weight|bias)")


def load_model(
    path: str | Path | CheckpointReader,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    experts: range | None = None,
) -> GptOssModel:
    """Load a checkpoint; with `experts`, only those experts' bytes are read."""
    reader = path if isinstance(path, CheckpointReader) else CheckpointReader(path)
    config = reader.config
    experts = experts if experts is not None else range(config.num_local_experts)
    with torch.device("meta"):
        model = GptOssModel(config, dtype, "meta", experts, mxfp4=reader.is_mxfp4)
    model = model.to_empty(device=device)
    targets = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, spec in reader.specs.items():
        if spec.is_expert:
            layer_prefix, leaf = name.rsplit(".", 1)
            buffer, transposed = _EXPERT_TENSORS[leaf]
            target = targets[f"{layer_prefix}.{buffer}"]
            value = reader.get_experts(name, experts.start, experts.stop)
            if transposed:
                value = value.transpose(1, 2)
        elif (fused := _QKV.fullmatch(name)) is not None:  # a row range of the fused qkv_proj
            layer, proj, leaf = fused.groups()
            attn = model.model.layers[int(layer)].self_attn
            target = getattr(attn.qkv_proj, leaf).narrow(0, *attn.qkv_rows(proj))
            value = reader.get(name)
        else:
            target = targets[name]
            value = reader.get(name)
        with torch.no_grad():
            target.copy_(value)
    model.finish_loading()  # what is not in the checkpoint (to_empty left it uninitialized)
    model.eval()
    logger.info("loaded %s (experts %d..%d) on %s in %s", reader.path, experts.start, experts.stop - 1, device, dtype)
    return model
