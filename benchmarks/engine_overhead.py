"""Engine overhead per decode step with the model's forward excluded.

    python benchmarks/engine_overhead.py                     # 256 running sequences, harmony vocab
    python benchmarks/engine_overhead.py --vocab 1024 --sampling top_p

The worker's model is replaced by one that returns fixed logits (no attention, no
experts, no KV writes), so what is timed is everything else a step does: scheduling and
block bookkeeping, building the StepPlan, the worker's input and attention-metadata
tensors, sampling over [S, V] logits, and postprocessing (appending tokens, stop checks,
TokenDeltas). Reported per phase, as the median over the timed steps. Sampling over a
201088-token vocabulary is memory-bound work that takes tens of microseconds on a GPU
but milliseconds on a CPU, so it is reported apart from the host-side bookkeeping.
On a shared machine, the thread's CPU time is the number to trust (wall time includes
time spent descheduled).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from gptoss_ray.config import EngineConfig
from gptoss_ray.engine.engine import LLMEngine, build_worker_config
from gptoss_ray.engine.executor import InProcessExecutor
from gptoss_ray.engine.sampler import Sampler
from gptoss_ray.engine.worker import Worker
from gptoss_ray.sampling_params import SamplingParams

SAMPLING = {
    "greedy": SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True),
    "top_p": SamplingParams(temperature=0.8, top_p=0.9, max_tokens=None, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.8, presence_penalty=0.5, frequency_penalty=0.5,
                                max_tokens=None, ignore_eos=True),
}


class FixedLogitsModel(nn.Module):
    """Stands in for GptOssModel: zero hidden states, the same logits every step."""

    def __init__(self, config, max_rows: int, device, logit_scale: float):
        super().__init__()
        self.config = config
        self.hidden = torch.zeros(8192, config.hidden_size, device=device)
        gen = torch.Generator().manual_seed(0)
        self.logits = (torch.randn(max_rows, config.vocab_size, generator=gen) * logit_scale).to(device)

    def forward(self, input_ids, positions, attn, kv_caches):
        return self.hidden[: input_ids.shape[0]]

    def compute_logits(self, hidden, float32: bool = True):
        return self.logits[: hidden.shape[0]]  # float32 either way (the model's dtype here)

    def moe_layers(self):
        return []

    def pack_for_cpu(self):
        return []

    def reserve_positions(self, n):
        pass


class TimedSampler(Sampler):
    def __init__(self, inner: Sampler, times: list[float], cpu_times: list[float]):
        self.__dict__.update(inner.__dict__)
        self.times, self.cpu_times = times, cpu_times

    def __call__(self, logits, meta):
        if logits.is_cuda:
            torch.cuda.synchronize()
        start, cpu_start = time.perf_counter(), time.thread_time()
        out = super().__call__(logits, meta)
        self.times.append(time.perf_counter() - start)
        self.cpu_times.append(time.thread_time() - cpu_start)
        return out


def make_worker_cls(vocab: int, max_rows: int, logit_scale: float):
    class FixedLogitsWorker(Worker):
        def load_model(self):
            from gptoss_ray.checkpoint import CheckpointReader

            config = CheckpointReader(self.config.model_path).config.model_copy(update={"vocab_size": vocab})
            return FixedLogitsModel(config, max_rows, self.device, logit_scale)

        def allocate_kv_cache(self, num_blocks):
            return []

    return FixedLogitsWorker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint whose config is used (default: tiny demo)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--vocab", type=int, default=201088)
    p.add_argument("--sampling", choices=sorted(SAMPLING), default="greedy")
    p.add_argument("--device", default="cpu")
    p.add_argument("--logit-scale", type=float, default=1.0,
                   help="std of the fixed logits: 1 is flat over the vocabulary (top-p needs a full sort), "
                        "4 is peaked like a trained model's (top-p stays within the top candidates)")
    args = p.parse_args()
    torch.set_num_threads(1)
    from gptoss_ray.checkpoint import default_demo_checkpoint

    config = EngineConfig(model=args.model or str(default_demo_checkpoint()), device=args.device,
                          max_num_seqs=args.num_seqs, num_kv_blocks=args.num_seqs * 64, block_size=16,
                          max_num_batched_tokens=max(2048, args.num_seqs), max_model_len=1024)
    worker_config, _ = build_worker_config(config)
    executor = InProcessExecutor(worker_config, make_worker_cls(args.vocab, args.num_seqs, args.logit_scale))
    engine = LLMEngine(config, executor=executor)
    sampler_times: list[float] = []
    sampler_cpu: list[float] = []
    executor.worker.sampler = TimedSampler(executor.worker.sampler, sampler_times, sampler_cpu)
    g = torch.Generator().manual_seed(0)
    for i in range(args.num_seqs):
        engine.add_request(f"r{i}", torch.randint(0, args.vocab, (args.prompt_len,), generator=g).tolist(),
                           SAMPLING[args.sampling])
    while engine.scheduler.waiting or any(not s.is_prefill_done for s in engine.scheduler.running):
        engine.step()
    sampler_times.clear()
    sampler_cpu.clear()
    phases: dict[str, list[float]] = {"schedule": [], "execute": [], "postprocess": [], "step": [], "step_cpu": []}
    for _ in range(args.steps):  # the three lines of LLMEngine.step, timed one by one
        c0, t0 = time.thread_time(), time.perf_counter()
        plan, scheduled = engine.scheduler.schedule()
        t1 = time.perf_counter()
        results = engine.executor.execute(plan)
        t2 = time.perf_counter()
        deltas = engine._postprocess(scheduled, results)
        t3, c3 = time.perf_counter(), time.thread_time()
        assert len(deltas) == args.num_seqs
        for name, value in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t3 - t0, c3 - c0)):
            phases[name].append(value)
    ms = {name: statistics.median(v) * 1e3 for name, v in phases.items()}
    sampler_ms = statistics.median(sampler_times) * 1e3
    # per step, so that a slow sampler step does not hide in the difference of medians
    host_ms = statistics.median(t - st for t, st in zip(phases["step"], sampler_times)) * 1e3
    # the same in this thread's CPU time: what a loaded machine's descheduling does not inflate
    host_cpu_ms = statistics.median(t - st for t, st in zip(phases["step_cpu"], sampler_cpu)) * 1e3
    print(f"{args.num_seqs} running sequences, vocab {args.vocab}, {args.sampling} sampling, {args.device}, "
          f"median of {args.steps} decode steps (ms):")
    print(f"  schedule {ms['schedule']:.3f} | execute {ms['execute']:.3f} (sampler {sampler_ms:.3f}) | "
          f"postprocess {ms['postprocess']:.3f}")
    print(f"  step total {ms['step']:.3f} ms wall, {ms['step_cpu']:.3f} ms CPU of this thread; "
          f"without the sampler's tensor work {host_ms:.3f} ms wall, {host_cpu_ms:.3f} ms CPU")

if __name__ == "__main__":
    main()
