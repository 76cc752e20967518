"""The Worker on the real tiny model: a step with no tokens on its rank still runs the model,
so an expert-parallel rank meets the others at every MoE layer's all-to-all without any
special case in the worker, the executor or the rank actor."""

from __future__ import annotations

from support.engine_helpers import make_engine

from gptoss_ray.engine.plan import RankPlan, StepPlan
from gptoss_ray.engine.worker import Worker


class CountingDispatch:
    """Wraps a MoE layer's dispatcher: how many calls, and how many tokens each carried."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, x, topk_ids, topk_weights, experts):
        self.tokens.append(x.shape[0])
        return self.inner(x, topk_ids, topk_weights, experts)


def test_a_step_with_no_tokens_runs_every_moe_layer_once(tiny_ckpt):
    engine = make_engine(tiny_ckpt)
    worker: Worker = engine.executor.worker
    counters = []
    for moe in worker.model.moe_layers():
        moe.dispatcher = CountingDispatch(moe.dispatcher)
        counters.append(moe.dispatcher)
    result = worker.execute(StepPlan(step_id=1, ranks=[RankPlan()]))
    assert result.seq_ids == [] and result.token_ids == []
    assert [c.tokens for c in counters] == [[0]] * len(counters)


def test_a_worker_holds_only_its_experts(tiny_ckpt):
    engine = make_engine(tiny_ckpt)
    worker = Worker(engine.worker_config, rank=1, experts=range(2, 5))
    for moe in worker.model.moe_layers():
        assert (moe.experts.start, moe.experts.end) == (2, 5)
