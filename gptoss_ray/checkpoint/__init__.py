"""Checkpoints in the Hugging Face gpt-oss layout: locate, read, write."""

from gptoss_ray.checkpoint.locate import locate
from gptoss_ray.checkpoint.read import CheckpointReader
from gptoss_ray.checkpoint.write import default_demo_checkpoint, write_checkpoint

__all__ = ["CheckpointReader", "default_demo_checkpoint", "locate", "write_checkpoint"]
