"""Where vLLM's CPU build spends a decode step of the shared workload: torch's profiler around
one generate, top ops by self time with their shapes. Runs in the peer's venv
(../shared/peer/README.md), as benchmarks/vs_vllm.py starts it:

    cd /tmp/peer && env -u PYTHONPATH OMP_NUM_THREADS=2 VLLM_ENABLE_V1_MULTIPROCESSING=0 \\
      TIKTOKEN_ENCODINGS_BASE=/tmp/enc VLLM_CACHE_ROOT=/tmp/peer/cache/vllm \\
      TORCHINDUCTOR_CACHE_DIR=/tmp/peer/cache/inductor XDG_CACHE_HOME=/tmp/peer/cache \\
      HF_HOME=/tmp/peer/cache/hf TMPDIR=/tmp/peer/tmp VLLM_NO_USAGE_STATS=1 \\
      /tmp/peer/venv/bin/python <repo>/benchmarks/profile_peer_vllm.py
"""

import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from torch.profiler import ProfilerActivity, profile  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

rng = random.Random(0)  # the peer scripts' prompts, id for id
prompts = [TokensPrompt(prompt_token_ids=[rng.randrange(0, 199998) for _ in range(64)]) for _ in range(16)]
params = SamplingParams(max_tokens=64, ignore_eos=True, temperature=0.0, detokenize=False)
llm = LLM(model="/tmp/peer/tiny-gptoss", skip_tokenizer_init=True, max_model_len=1024, dtype="bfloat16", seed=0,
          kv_cache_memory_bytes=268435456)
for _ in range(2):
    llm.generate(prompts, params, use_tqdm=False)
start = time.perf_counter()
llm.generate(prompts, params, use_tqdm=False)
print(f"one generate: {time.perf_counter() - start:.3f} s")
with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
    llm.generate(prompts, params, use_tqdm=False)
print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=30))
