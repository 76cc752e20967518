"""Launches per decode step per layer on the GPU path: every aten op the forward dispatches,
counted with a TorchDispatchMode, and every Triton kernel counted as one launch.

    TRITON_INTERPRET=1 GPTOSS_KERNELS=triton python benchmarks/launches.py   # on CPU (the interpreter)
    python benchmarks/launches.py                                            # on a CUDA box

With GPTOSS_KERNELS=triton (the default on CUDA) the attention and expert matmuls are
Triton kernels; everything else the model does is eager aten ops, each a kernel launch
(or, for views, host time only: counted apart). Ops inside a Triton launch (the
interpreter's own tensor copies on CPU) are not counted. The step is a pure decode of
`batch` sequences with 40 tokens of context each, after an uncounted prefill; the model is
the gpt-oss-20b layer shape with 2 layers (launches per layer do not depend on the depth,
and the op count does not depend on the widths) unless --preset says otherwise.

Prints, per batch size: aten ops per layer (all / excluding those that
only alias an input: views, no-op casts), Triton launches per
layer, and the ops outside the layers (embedding, final norm).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes


class LaunchCounter(TorchDispatchMode):
    """Counts aten ops by name, attributed to the current `scope` (set by module hooks)."""

    def __init__(self):
        super().__init__()
        self.scope = "other"
        self.ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.views: dict[str, int] = collections.Counter()
        self.triton: dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        self.ops[self.scope][name] += 1
        out = func(*args, **(kwargs or {}))
        if not func._schema.is_mutable and _aliases_input(out, args, kwargs):
            self.views[self.scope] += 1  # a view, or a no-op .to()/.contiguous(): host time only
        return out


def _storages(tree) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves(tree)
            if isinstance(t, torch.Tensor) and t.device.type != "meta"}


def _aliases_input(out, args, kwargs) -> bool:
    """True when every tensor the op returned shares storage with an input: no kernel ran."""
    outs = _storages(out)
    return bool(outs) and outs <= _storages((args, kwargs))


@contextlib.contextmanager
def count_triton(counter: LaunchCounter):
    """Each Triton kernel launch counts once; the interpreter's own torch calls are hidden."""
    patched = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit

        classes = [interp.InterpretedFunction, jit.JITFunction]
    except ImportError:
        classes = []
    for cls in classes:
        original = cls.run

        def run(self, *args, __original=original, **kwargs):
            counter.triton[counter.scope] += 1
            with _disable_current_modes():
                return __original(self, *args, **kwargs)

        cls.run = run
        patched.append((cls, original))
    try:
        yield
    finally:
        for cls, original in patched:
            cls.run = original


def count_decode(model, batch: int, context: int, device) -> dict:
    from gptoss_ray.model.attention import allocate_kv_cache, contiguous_metadata

    block = 16
    max_blocks = context // block + 2
    n = max_blocks * batch
    kv = allocate_kv_cache(model.config, {"full_attention": n, "sliding_attention": n}, block, model.dtype, device)
    gen = torch.Generator().manual_seed(0)
    prompt = context - 1
    ids = torch.randint(0, 1000, (batch * prompt,), generator=gen).to(device)
    pos = torch.arange(prompt).repeat(batch).to(device)
    model(ids, pos, contiguous_metadata([prompt] * batch, [prompt] * batch, block, max_blocks, device), kv)
    step_ids = torch.randint(0, 1000, (batch,), generator=gen).to(device)
    step_pos = torch.full((batch,), prompt, device=device)
    meta = contiguous_metadata([1] * batch, [context] * batch, block, max_blocks, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    counter = LaunchCounter()
    hooks = []
    for layer in model.model.layers:
        hooks.append(layer.register_forward_pre_hook(lambda *_: setattr(counter, "scope", "layers")))
        hooks.append(layer.register_forward_hook(lambda *_: setattr(counter, "scope", "other")))
    try:
        with count_triton(counter), counter:
            model(step_ids, step_pos, meta, kv)
    finally:
        for h in hooks:
            h.remove()
    layers = model.config.num_hidden_layers
    in_layers = sum(counter.ops["layers"].values())
    return {
        "batch": batch,
        "aten_per_layer": in_layers / layers,
        "aten_per_layer_no_views": (in_layers - counter.views["layers"]) / layers,
        "triton_per_layer": counter.triton["layers"] / layers,
        "launches_per_layer": (in_layers - counter.views["layers"] + counter.triton["layers"]) / layers,
        "aten_outside_layers": sum(counter.ops["other"].values()),
        "top_ops_per_layer": {k: v / layers for k, v in counter.ops["layers"].most_common(12)},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--context", type=int, default=40)
    p.add_argument("--preset", default="tiny", help="checkpoint shape (tiny: fast in the interpreter)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    from gptoss_ray.checkpoint import write_checkpoint
    from gptoss_ray.config import PRESETS
    from gptoss_ray.model.loader import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kernels = os.environ.get("GPTOSS_KERNELS", "auto")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(PRESETS[args.preset], tmp, seed=0, num_shards=1)
        model = load_model(path, dtype=getattr(torch, args.dtype), device=device)
    rows = [count_decode(model, b, args.context, device) for b in args.batch]
    print(f"device={device.type} GPTOSS_KERNELS={kernels} preset={args.preset} dtype={args.dtype}")
    print(f"{'batch':>5} {'aten/layer':>11} {'non-view':>9} {'triton':>7} {'launches/layer':>15} {'outside layers':>15}")
    for r in rows:
        print(f"{r['batch']:>5} {r['aten_per_layer']:>11.1f} {r['aten_per_layer_no_views']:>9.1f} "
              f"{r['triton_per_layer']:>7.1f} {r['launches_per_layer']:>15.1f} {r['aten_outside_layers']:>15}")
    for r in rows:
        print(f"batch {r['batch']} most frequent ops per layer:", json.dumps(r["top_ops_per_layer"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
