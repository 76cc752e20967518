"""gptoss-ray: serve OpenAI's gpt-oss models on a Ray cluster.

`from gptoss_ray import LLM, SamplingParams` is the offline API (shaped like vLLM's).
`LLM` is imported lazily so that torch-free layers (serve, harmony) stay torch-free.
"""

from gptoss_ray.sampling_params import SamplingParams, TokenDelta

__all__ = ["LLM", "SamplingParams", "TokenDelta"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "LLM":
        from gptoss_ray.engine.llm import LLM

        return LLM
    raise AttributeError(name)
