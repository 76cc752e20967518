"""C kernels for a CPU decode step (csrc/*.c), built into one library on first use.

- `moe_decode` (csrc/moe_decode.c): the step's experts. On CPU a decode step's MoE is bound
  by reading the chosen experts' weights once, which the torch ops cannot do in one pass:
  the dense path (moe.py, two oneDNN GEMMs over every expert plus a dozen small ops) spent
  ~1.6 ms a layer on the shared workload where the weights' bytes take ~0.5 ms, which is
  what vLLM's CPU build spends in its own fused C++ MoE kernel (benchmarks/RESULTS.md,
  "where vLLM's CPU step goes"). It reads each chosen expert's bf16 weights once with
  AVX512-BF16 dot products (float32 ones with AVX-512 FMAs, where the grouped pairs path
  loops over the experts a matmul call each) and keeps the dense path's arithmetic
  (moe_experts_dense).
- `paged_decode` (csrc/attention_decode.c): decode attention with sinks and windows read
  straight from the paged cache, one call a layer, where the torch path (attention_cpu.py)
  gathers the keys and values into copies and corrects torch's flash output for the sinks.

Both thread through OpenMP (the runtime torch already loaded: the loader reuses it). The
library is compiled with the system C compiler into a cache directory keyed by the sources'
hash (~1 s). Where there is no compiler, no AVX512-BF16, the build fails, or
GPTOSS_KERNELS=reference, `library()` is None and the torch paths run. Nothing here runs on
CUDA.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SOURCES = sorted(Path(__file__).with_name("csrc").glob("*.c"))
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512bf16", "-fopenmp", "-shared", "-fPIC"]


def _cpu_has_avx512_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _cache_dir() -> Path:
    base = os.environ.get("GPTOSS_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "gptoss_ray", "kernels")
    return Path(base)


def build() -> Path | None:
    """The compiled library's path (built now if not cached), or None where it cannot be."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not _cpu_has_avx512_bf16():
        return None
    source = b"".join(path.read_bytes() for path in SOURCES)
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gptoss_cpu_kernels-{digest}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, then renamed: no torn file
            out = Path(tmp) / target.name
            subprocess.run([compiler, *FLAGS, *map(str, SOURCES), "-o", str(out), "-lm"], check=True,
                           capture_output=True, timeout=120)
            os.replace(out, target)
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("CPU kernels not built (%s): the torch paths run", e)
        return None
    return target


@functools.lru_cache(maxsize=1)
def _load():
    path = build()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        logger.warning("CPU kernels not loaded (%s): the torch paths run", e)
        return None
    lib.moe_decode.restype = lib.paged_decode.restype = ctypes.c_int
    lib.moe_decode.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 5 + [ctypes.c_float] * 2 + [ctypes.c_int]
    lib.paged_decode.argtypes = ([ctypes.c_void_p] * 4 + [ctypes.c_int] + [ctypes.c_void_p] * 2 + [ctypes.c_float]
                                 + [ctypes.c_int] + [ctypes.c_void_p] + [ctypes.c_int] * 7)
    return lib


def library():
    """The built library, or None (see the module's docstring)."""
    if os.environ.get("GPTOSS_KERNELS", "auto") == "reference":
        return None
    return _load()


def moe_takes(dtype: torch.dtype, hidden_size: int, intermediate_size: int) -> bool:
    """Whether plain CPU experts of this dtype and shape take the kernel: bf16 or float32, H
    and I multiples of 32, the kernel built, and GPTOSS_KERNELS not "reference" (the torch paths)."""
    return (dtype in (torch.bfloat16, torch.float32) and hidden_size % 32 == 0 and intermediate_size % 32 == 0
            and library() is not None)


def supports(gate_up_weight: torch.Tensor, down_weight: torch.Tensor) -> bool:
    """`moe_takes` for these expert weights ([E, 2I, H] and [E, H, I]), on CPU."""
    e, two_i, h = gate_up_weight.shape
    return (gate_up_weight.device.type == "cpu" and down_weight.dtype == gate_up_weight.dtype
            and moe_takes(gate_up_weight.dtype, h, two_i // 2))


def moe_decode(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, gate_up_weight: torch.Tensor,
               gate_up_bias: torch.Tensor, down_weight: torch.Tensor, down_bias: torch.Tensor, alpha: float,
               limit: float) -> torch.Tensor:
    """x [T, H], topk_ids [T, K] local expert ids, topk_weights [T, K] -> [T, H] summed over K,
    everything but the ids in the weights' dtype (bf16 or float32), the weights as
    LocalExperts holds them: gate_up [E, 2I, H] with interleaved gate/up rows, down [E, H, I],
    contiguous. Callers check `supports` first."""
    t, k = topk_ids.shape
    e, two_i, h = gate_up_weight.shape
    dtype = gate_up_weight.dtype
    x, ids, w = x.to(dtype).contiguous(), topk_ids.to(torch.int64).contiguous(), topk_weights.to(dtype).contiguous()
    out = torch.empty(t, h, dtype=dtype)
    status = library().moe_decode(x.data_ptr(), ids.data_ptr(), w.data_ptr(), gate_up_weight.data_ptr(), gate_up_bias.data_ptr(),
                      down_weight.data_ptr(), down_bias.data_ptr(), out.data_ptr(), t, k, h, two_i // 2, e, alpha,
                      limit, int(dtype == torch.bfloat16))
    if status != 0:
        raise RuntimeError(f"CPU MoE kernel failed (status {status}: 1 out of memory, 2 an expert id out of range)")
    return out


def attention_takes(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether a CPU decode step's attention takes `paged_decode`: bf16 or float32 q and cache
    of one dtype, head dim a multiple of 16 (<= 256), at most 16 query heads per kv head."""
    hq, d, hkv = q.shape[1], q.shape[2], k_cache.shape[2]
    return (not q.is_cuda and q.dtype in (torch.bfloat16, torch.float32) and k_cache.dtype == q.dtype
            and d % 16 == 0 and d <= 256 and hq % hkv == 0 and hq // hkv <= 16 and library() is not None)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 context_lens: torch.Tensor, sinks: torch.Tensor, sm_scale: float, window: int | None) -> torch.Tensor:
    """q [B, Hq, D] (one query per sequence), caches [NB, BS, Hkv, D], block_tables [B, MB]
    (-1: none), context_lens [B] -> [B, Hq, D] in q's dtype: attention.paged_attention_ref's
    decode step. Callers check `attention_takes` first."""
    b, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    q, tables = q.contiguous(), block_tables.to(torch.int32).contiguous()
    ctx, sinks = context_lens.to(torch.int32).contiguous(), sinks.float().contiguous()
    out = torch.empty_like(q)
    status = library().paged_decode(q.data_ptr(), k_cache.contiguous().data_ptr(), v_cache.contiguous().data_ptr(),
                                    tables.data_ptr(), tables.shape[1], ctx.data_ptr(), sinks.data_ptr(), sm_scale,
                                    window or 0, out.data_ptr(), b, hq, hkv, d, bs, nb, int(q.dtype == torch.bfloat16))
    if status != 0:
        raise RuntimeError(f"CPU decode attention failed (status {status}: 1 unsupported shape, 2 a block id out of range)")
    return out
