"""Constrained decoding on a worker: one grammar matcher per constrained sequence, one token
bitmask per constrained row, applied to the logits before sampling.

Where (and why there): the worker that samples a sequence owns its matcher. With ep_size > 1
each rank samples the sequences placed on it, so masks are built next to the logits they
mask, the grammar travels once (in SamplingParams, inside NewSequence), and no per-step
mask (25 KiB a row for the 201k vocab) ever crosses a process boundary. The engine only
validates the grammar when the request arrives (a 400 instead of a failed step).

The step (Worker._run): forward is launched -> `fill` computes the masks of this step's
constrained rows on the CPU (on a GPU this overlaps the forward, which runs asynchronously)
into a pinned [R, V/32] int32 buffer and copies the rows in use to a device buffer of fixed
shape (an input buffer, outside any captured graph) -> the Sampler applies it first, so
penalties, bias, greedy / temperature / top-k / top-p / min-p and logprobs all see the
masked distribution (reported logprobs of a constrained row are those of the masked,
renormalized distribution) -> `advance` feeds each sampled token to its matcher.
Unconstrained rows pay nothing: the step with no constrained row skips all of this.

Preemption by recompute: the engine drops the worker's mirror and re-sends the sequence with
every token it has; `GrammarState.start` rebuilds the matcher by replaying the output tokens
already generated, so no token is consumed twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from gptoss_ray.harmony import guidance

logger = logging.getLogger(__name__)

@dataclass(eq=False)
class GrammarState:
    """One sequence's matcher."""

    matcher: object  # llguidance.LLMatcher
    broken: bool = False  # a consumed token was rejected (never expected: the mask forbids it)

    @classmethod
    def start(cls, grammar: str, output_ids: list[int]) -> GrammarState:
        state = cls(guidance.matcher(grammar))
        if output_ids and not state.matcher.consume_tokens(list(output_ids)):
            state.broken = True
            logger.warning("replaying %d output tokens broke the grammar: %s", len(output_ids),
                           state.matcher.get_error())
        return state

    def advance(self, token_id: int) -> None:
        if self.broken or self.matcher.is_stopped():
            return
        if not self.matcher.consume_token(token_id):
            self.broken = True
            logger.warning("sampled token %d rejected by its grammar: %s", token_id, self.matcher.get_error())


class GrammarMasks:
    """The bitmask buffers of one worker: [R, ceil(V/32)] int32 (bit j of word w allows token
    32w + j), R = the most sequences the worker holds."""

    def __init__(self, max_rows: int, vocab_size: int, device: torch.device):
        import llguidance

        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        pin = device.type == "cuda"
        self.host = torch.full((max_rows, self.words), -1, dtype=torch.int32, pin_memory=pin)
        self.device_buf = self.host if device.type == "cpu" else torch.empty_like(self.host, device=device)
        # llguidance computes the masks of many matchers on its own threads (the GIL is released)
        self.executor = llguidance.LLExecutor()

    def fill(self, states: list[GrammarState]) -> torch.Tensor:
        """The masks of these matchers, row i for states[i]: [C, W] int32 on the device."""
        live = []
        for i, st in enumerate(states):
            if st.broken:
                self.host[i].fill_(-1)  # a broken matcher constrains nothing rather than everything
            else:
                live.append((st.matcher, i))
        if live:
            self.executor.unsafe_compute_mask_ptr(live, self.host.data_ptr(), self.words * 4, len(states))
        c = len(states)
        if self.device_buf is self.host:
            return self.host[:c]
        self.device_buf[:c].copy_(self.host[:c], non_blocking=True)
        return self.device_buf[:c]


def apply_token_bitmask(logits: torch.Tensor, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """logits [S, V] with the tokens each row's bitmask forbids set to -inf (rows [C] index S,
    mask [C, W]). In place: the sampler owns its float32 logits. On a CPU the bits are
    unpacked by numpy (one pass, no [C, V, 32] intermediate); on a GPU by shifts."""
    c, v = mask.shape[0], logits.shape[1]
    if mask.device.type == "cpu":
        bits = np.unpackbits(mask.numpy().view(np.uint8), axis=-1, bitorder="little")  # [C, 32W] uint8
        forbidden = torch.from_numpy(bits[:, :v]) == 0  # [C, V] bool
    else:
        shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
        forbidden = ((mask.unsqueeze(-1) >> shifts) & 1).reshape(c, -1)[:, :v] == 0  # [C, V]
    if c == logits.shape[0]:  # every row constrained (rows is then 0..S-1 in order): no gather / scatter
        return logits.masked_fill_(forbidden, float("-inf"))
    logits[rows] = logits[rows].masked_fill(forbidden, float("-inf"))
    return logits
