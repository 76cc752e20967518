"""The output path shared by the serve layer and `LLM`: tokens in, visible text out.

`processor.OutputProcessor` (detokenize, harmony-parse for chat, stop strings, finish
reasons, logprobs) over `stop.StopMatcher`. Torch-free.
"""

from gptoss_ray.output.processor import OutputProcessor, SampleOutput
from gptoss_ray.output.stop import StopMatcher

__all__ = ["OutputProcessor", "SampleOutput", "StopMatcher"]
