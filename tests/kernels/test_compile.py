"""The Triton kernels compile all the way to cubin for A100 (sm_80) and H100 (sm_90) on a
machine without a GPU: Triton's bundled LLVM and ptxas need no driver. The interpreter tests
prove the arithmetic; this proves the same source is valid for the real compiler (tl.dot
shapes, layouts, shared memory), which the interpreter does not check.

Runs in a subprocess because the other kernel tests set TRITON_INTERPRET=1, which makes
triton.jit build interpreter functions instead of compilable ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from gptoss_kernels import attention_triton, moe_triton

    FLOATS = {"alpha", "limit", "qk_scale"}
    POINTERS = {"w_ptr": "*u8", "s_ptr": "*u8", "order_ptr": "*i64", "route_w_ptr": "*fp32", "sinks_ptr": "*fp32",
                "block_tables_ptr": "*i32", "context_lens_ptr": "*i32", "m_split_ptr": "*fp32",
                "l_split_ptr": "*fp32", "acc_split_ptr": "*fp32"}

    def signature(fn, constexprs, dense_weights=False):
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name.endswith("_ptr"):
                sig[name] = POINTERS.get(name, "*i32" if name.startswith("tile_") else "*bf16")
                if dense_weights and name in ("w_ptr", "s_ptr"):
                    sig[name] = "*bf16"
            else:
                sig[name] = "fp32" if name in FLOATS else "i32"
        return sig

    cap = int(sys.argv[1])
    cases = []
    for quant in (True, False):
        for fn, bm in ((moe_triton._gate_up_swiglu_kernel, 64), (moe_triton._down_kernel, 16)):
            c = dict(QUANT=quant, BM=bm, BN=32 if fn is moe_triton._gate_up_swiglu_kernel else 64, BK=64, PREC="tf32",
                     DOT_F32=False)
            cases.append((fn, c, not quant, 8 if bm == 64 else 4))  # the wrapper's num_warps
    for window, split in ((True, False), (False, False), (True, True), (False, True)):
        c = dict(BS=16, G=8, G_PAD=8, BQ=8, BN=64, BD=64, HAS_WINDOW=window, SPLIT=split, PREC="tf32",
                 DOT_F32=False)
        cases.append((attention_triton._paged_attention_kernel, c, False, 8))
    cases.append((attention_triton._combine_splits_kernel, dict(BSPLIT=16, BD=64), False, 4))
    for fn, c, dense, warps in cases:
        src = ASTSource(fn, signature(fn, c, dense), c)
        kernel = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": warps, "num_stages": 3})
        assert kernel.asm["cubin"], fn.__name__
        print(fn.__name__, c, "shared", kernel.metadata.shared)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("capability", [80, 90], ids=["sm_80-A100", "sm_90-H100"])
def test_kernels_compile_to_cubin(capability, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # never the user's cache
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(capability)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("shared") == 9


def test_cpu_tensors_without_the_interpreter_fail_with_a_clear_message():
    code = (
        "import torch\n"
        "from gptoss_kernels.ops import paged_attention\n"
        "q = torch.zeros(1, 2, 16); kv = torch.zeros(2, 4, 1, 16)\n"
        "paged_attention(q, kv, kv, torch.zeros(1, 1, dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),\n"
        "                torch.tensor([1], dtype=torch.int32), torch.zeros(2), 1.0)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["GPTOSS_KERNELS"] = "triton"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "set TRITON_INTERPRET=1" in proc.stderr
