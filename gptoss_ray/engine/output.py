"""After a token is sampled: does the sequence stop, and which tokens may the caller see.

Stop strings are matched on decoded text. The engine speaks token ids, and a token cannot
be split, so: tokens whose text might begin a stop string are held back until the match
is ruled out, and on a match the caller gets the tokens that end before it (the stop
string is never returned; text sharing a token with its start is dropped with it).
"""

from __future__ import annotations

from collections.abc import Callable

from gptoss_ray.engine.sequence import Sequence


def harmony_decoder() -> Callable[[list[int]], str] | None:
    """The o200k_harmony detokenizer, or None if it cannot be loaded here."""
    try:
        from gptoss_ray.harmony.encoding import decode
    except ImportError:
        return None
    return decode


class StopChecker:
    def __init__(self, eos_token_ids: set[int], max_model_len: int, decode: Callable[[list[int]], str] | None):
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.decode = decode

    def check(self, seq: Sequence) -> int:
        """Set seq.finish_reason / stop_reason if `seq` (its last token just appended) is
        done; return how many output tokens the caller may have seen in total."""
        p, token, num_out = seq.params, seq.token_ids[-1], seq.num_output_tokens
        visible = num_out
        if num_out >= p.min_tokens:
            if token in p.stop_token_ids:
                seq.finish_reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in self.eos_token_ids:
                seq.finish_reason = "stop"
            elif p.stop:
                visible = self._check_stop_strings(seq)
        if seq.finish_reason is None:
            max_tokens = p.max_tokens if p.max_tokens is not None else self.max_model_len
            if num_out >= max_tokens or seq.num_tokens >= self.max_model_len:
                seq.finish_reason = "length"
                visible = num_out  # no stop string matched: release what was held back
        return visible

    def _check_stop_strings(self, seq: Sequence) -> int:
        out = seq.output_token_ids
        # Offsets for every output token (tokens generated before min_tokens included).
        while len(seq.text_offsets) < len(out):
            seq.text_offsets.append(len(self.decode(out[: len(seq.text_offsets) + 1])))
        text = self.decode(out)
        longest = max(len(s) for s in seq.params.stop)
        prev_end = seq.text_offsets[-2] if len(out) > 1 else 0
        search_from = max(0, prev_end - longest + 1)  # only matches that touch the new text
        matches = [(i, s) for s in seq.params.stop if (i := text.find(s, search_from)) >= 0]
        if matches:
            cut, stop = min(matches)
            seq.finish_reason, seq.stop_reason = "stop", stop
            return sum(1 for end in seq.text_offsets if end <= cut)
        # Hold back the tail that could still grow into a stop string.
        hold = max((k for s in seq.params.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return sum(1 for end in seq.text_offsets if end <= len(text) - hold)
