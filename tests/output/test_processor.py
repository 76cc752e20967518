"""The output processor on known token streams: text, stop strings, finish reasons, logprobs.

Each case feeds the engine's deltas as the engine would (a few tokens per step, or one),
and checks what a client would see, streamed (pieces joined) and whole alike."""

from __future__ import annotations


from gptoss_ray.harmony.encoding import get_encoding
from gptoss_ray.output import OutputProcessor
from gptoss_ray.sampling_params import SamplingParams, TokenDelta

_A = "<|channel|>analysis<|message|>"
_FINAL = "<|end|><|start|>assistant<|channel|>final<|message|>"


def ids(text: str) -> list[int]:
    return get_encoding().encode(text, allowed_special="all")


def char_tokens(text: str) -> list[int]:
    """One token per character (each character alone is one token in o200k)."""
    out = []
    for c in text:
        (t,) = ids(c)
        out.append(t)
    return out


def run(tokens: list[int], per_step: int = 3, harmony: bool = False, finish: str = "length", **params):
    """Feed `tokens` in deltas of `per_step`; the engine would end with `finish` after the
    last one unless the processor ended the sample first. Returns (outputs, processor)."""
    p = SamplingParams(**({"max_tokens": 1000} | params))
    proc = OutputProcessor(p, harmony=harmony)
    outs = []
    for start in range(0, len(tokens), per_step):
        last = start + per_step >= len(tokens)
        step = tokens[start:start + per_step]
        delta = TokenDelta("r", 0, step, logprobs=[{t: -0.25} for t in step] if p.logprobs is not None else None,
                           finish_reason=finish if last else None)
        out = proc.process(delta)
        if out is None:  # the processor ended it: the engine's later deltas are ignored
            continue
        outs.append(out)
    return outs, proc


def text_of(outs) -> str:
    return "".join(o.text for o in outs)


def content_of(outs) -> str:
    return "".join(p.text for o in outs for p in o.pieces if p.kind == "content")


def consumed(outs) -> int:
    return sum(len(o.token_ids) for o in outs)


# --- text mode (/v1/completions, LLM) --------------------------------------------------


def test_stop_inside_a_token_trims_its_text_and_counts_it():
    tokens = ids(" marqué de la fin")
    assert get_encoding().decode([tokens[0]]) == " marqué"  # one token
    for per_step in (1, 3):
        outs, proc = run(tokens, per_step, stop=["qué"])
        assert text_of(outs) == " mar" and consumed(outs) == 1
        last = outs[-1]
        assert (last.finish_reason, last.stop_reason, last.abort) == ("stop", "qué", True)
        assert proc.finished


def test_one_character_tokens_show_exactly_the_text_before_the_stop():
    tokens = char_tokens("hello STOP world")
    outs, _ = run(tokens, per_step=1, stop=["STOP"])
    assert text_of(outs) == "hello " and len(text_of(outs)) == 6
    assert consumed(outs) == len("hello STOP")  # up to the token that completed the stop string
    assert [o.text for o in outs[:5]] == list("hello")  # no lag where no stop string can start


def test_stop_string_spanning_several_tokens():
    text = "alpha beta STOP gamma"
    tokens = ids(text)
    stop = "ta STOP ga"
    assert not any(stop in get_encoding().decode([t]) for t in tokens)  # it spans tokens
    outs, _ = run(tokens, 2, stop=[stop])
    assert text_of(outs) == "alpha be" and outs[-1].stop_reason == stop
    assert consumed(outs) == len(ids("alpha beta STOP gamma"))  # through " gamma", which completed it


def test_several_stop_strings_the_first_to_appear_wins():
    outs, _ = run(ids("one two three four"), 1, stop=["four", "three", "two three"])
    assert text_of(outs) == "one " and outs[-1].stop_reason == "two three"


def test_multibyte_characters_split_across_tokens():
    tokens = ids("fête 🎉🎉 done")
    pieces = [get_encoding().decode([t], errors="replace") for t in tokens]
    assert any("\ufffd" in p for p in pieces)  # 🎉 is split across two tokens
    outs, _ = run(tokens, 1)
    assert text_of(outs) == "fête 🎉🎉 done" and all("\ufffd" not in o.text for o in outs)
    # a stop string made of a split character matches once its last byte arrives
    outs, _ = run(tokens, 1, stop=["🎉"])
    assert text_of(outs) == "fête " and outs[-1].stop_reason == "🎉"
    assert consumed(outs) == len(ids("fête 🎉"))


def test_a_prefix_that_never_completes_is_released_at_the_end():
    for finish in ("length", "stop"):
        outs, _ = run(ids("wait for it STO"), 1, stop=["STOP"], finish=finish)
        assert text_of(outs) == "wait for it STO" and outs[-1].finish_reason == finish
        assert not outs[-1].abort


def test_min_tokens_defers_stop_strings():
    tokens = char_tokens("abab!")
    outs, _ = run(tokens, 1, stop=["ab"], min_tokens=3)
    # "ab" completes at tokens 2 and 4: only the second counts
    assert text_of(outs) == "ab" and consumed(outs) == 4


def test_text_mode_logprobs_cover_every_consumed_token():
    outs, _ = run(ids(" marqué de la fin"), 1, stop=["la"], logprobs=0)
    lps = [entry for o in outs for entry in o.logprobs]
    assert len(lps) == consumed(outs) == len(ids(" marqué de la"))


def test_engine_finish_reasons_pass_through():
    outs, _ = run(ids("abc"), 3, finish="stop")
    assert outs[-1].finish_reason == "stop"
    outs, _ = run(ids("abc"), 3, finish="error")
    assert outs[-1].finish_reason == "error"


def test_n_samples_are_independent():
    proc = OutputProcessor(SamplingParams(n=2, stop=["b"], max_tokens=10))
    a = proc.process(TokenDelta("r", 0, char_tokens("ab")))
    assert (a.text, a.finish_reason, a.abort) == ("a", "stop", True) and not proc.finished
    assert proc.process(TokenDelta("r", 0, [], finish_reason="abort")) is None  # the engine's abort echo
    b = proc.process(TokenDelta("r", 1, char_tokens("cc"), finish_reason="length"))
    assert (b.text, b.finish_reason) == ("cc", "length") and proc.finished


# --- chat (harmony) ------------------------------------------------------------------------


def test_chat_stop_cuts_the_final_content_not_the_reasoning():
    text = f"{_A}I will say STOP now.{_FINAL}The answer STOP is 4.<|return|>"
    for per_step in (1, 3):
        outs, proc = run(ids(text), per_step, harmony=True, stop=["STOP"], finish="stop")
        sample = proc.samples[0]
        assert sample.reasoning == "I will say STOP now."  # reasoning is never cut
        assert sample.content == content_of(outs) == "The answer "
        assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == "STOP" and outs[-1].abort
        assert consumed(outs) == len(ids(f"{_A}I will say STOP now.{_FINAL}The answer STOP"))


def test_chat_marque_in_the_final_channel():
    outs, proc = run(ids(f"{_A}Pense.{_FINAL} marqué de<|return|>"), 1, harmony=True, stop=["qué"], logprobs=0)
    assert proc.samples[0].content == " mar"
    assert [t for o in outs for t, _ in o.logprobs] == ids(" marqué")  # the token that made " mar"


def test_chat_logprobs_for_every_content_token_of_plain_output():
    # No harmony header: the first 32 tokens wait as a possible header, then turn out to be
    # the reply. Every one of the 64 tokens produced content and has its entry.
    tokens = ids(" ".join(["word"] * 64))
    assert len(tokens) == 64
    for per_step in (1, 5):
        outs, proc = run(tokens, per_step, harmony=True, logprobs=0)
        entries = [t for o in outs for t, _ in o.logprobs]
        assert entries == tokens and proc.samples[0].content == " ".join(["word"] * 64)


def test_chat_logprobs_stop_at_the_cut_and_wait_for_held_back_text():
    text = f"{_A}r{_FINAL}one two three<|return|>"
    outs, proc = run(ids(text), 1, harmony=True, stop=["two t"], logprobs=0)
    assert proc.samples[0].content == "one "
    # " two" made the visible " "; " three" is all inside the stop string
    assert [t for o in outs for t, _ in o.logprobs] == ids("one two")
    outs, _ = run(ids(f"{_A}r{_FINAL}one 2two three<|return|>"), 1, harmony=True, stop=["two t"], logprobs=0)
    assert content_of(outs) == "one 2"
    assert [t for o in outs for t, _ in o.logprobs] == ids("one 2")  # "two" shows nothing
    # a held-back token's entry waits for its text: "two" is held while it may start "two t"
    step = [o for o in outs if o.pieces]
    sent_before_cut = [t for o in outs[:-1] for t, _ in o.logprobs]
    assert ids("two")[0] not in sent_before_cut and step


def test_chat_tool_call_finish_reason():
    text = f'{_A}call it<|end|><|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json<|message|>{{"a": 1}}<|call|>'
    outs, proc = run(ids(text), 3, harmony=True, finish="stop", stop=["a"])
    assert outs[-1].finish_reason == "tool_calls" and proc.samples[0].tool_calls[0].arguments == '{"a": 1}'
