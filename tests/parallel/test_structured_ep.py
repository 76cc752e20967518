"""Constrained decoding over two expert-parallel ranks: each rank builds the masks of the
sequences it samples (the grammar travels in SamplingParams), and the constrained greedy
tokens equal one rank's."""

from __future__ import annotations

import pytest
from support.parallel_helpers import PROMPTS, make_engine

from gptoss_ray.harmony import grammar as hg
from gptoss_ray.sampling_params import SamplingParams

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.slow]  # two Ray workers each build the adapter


def _run(ckpt, ep_size: int, g: str) -> tuple[dict, set[int]]:
    engine = make_engine(ckpt, ep_size)
    try:
        for i, p in enumerate(PROMPTS[:4]):
            engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=20, grammar=g))
        out, ranks = {}, set()
        while engine.has_unfinished_requests():
            deltas = engine.step()
            ranks |= {seq.rank for seq in engine.scheduler.running}
            for d in deltas:
                out.setdefault(d.request_id, []).extend(d.token_ids)
        return out, ranks
    finally:
        engine.shutdown()


def test_constrained_decoding_over_two_ranks_matches_one(tiny_moe_ckpt):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"]}
    g = hg.chat_grammar({"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}, None, None,
                        max_tokens=20, max_reasoning_tokens=3)
    one, _ = _run(tiny_moe_ckpt, 1, g)
    two, ranks = _run(tiny_moe_ckpt, 2, g)
    assert ranks == {0, 1}
    assert two == one
    assert all(tokens[0] == 200005 for tokens in two.values())  # <|channel|>: the grammar held on both ranks
