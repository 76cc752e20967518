"""The output processor: the engine's token deltas in, what the caller may see out.

One request's samples, each one: detokenize incrementally (harmony's tokenizer, each
token decoded once; a UTF-8 character split across tokens waits for its last byte), parse
harmony channels for chat, cut at the first stop string at the exact character, decide
the finish reason, and pick the logprobs to return. The engine only stops on what it can
see in token ids (stop token ids, EOS, `min_tokens`, lengths); a stop string found here
ends the sample here, and `SampleOutput.abort` asks the caller to stop it in the engine
(vLLM v1's frontend `OutputProcessor` and its `reqs_to_abort` are the model).

Where it runs. Under Ray Serve, in the ingress (`ServingContext.generate`), next to the
harmony parser, not in the LLMServer replica next to the engine:
- chat stop strings apply to the visible final content, which only exists after the
  harmony parse, and the parser belongs with the HTTP formatting that uses it;
- text work stays off the replica, whose event loop and Python threads share the GIL
  with the engine's step loop (a slow stop-string scan there stalled every request,
  issue 13); ingress replicas scale on their own;
- the cost is a Ray round trip for the abort: a sample stopped by a string may compute a
  few more tokens, which are dropped here and never counted.
Offline, `LLM.generate` runs it in the same loop as `LLMEngine.step()` and aborts at once.

Counting, as OpenAI and vLLM do: a sample consumes its tokens up to and including the
one whose text completes a stop string (usage's completion_tokens counts them); the
visible text ends where the stop string begins, even inside a token (stop "qué" on the
token " marqué" leaves " mar"). Text mode (completions, LLM) returns the logprobs of
every consumed token; chat returns them for the tokens that produced visible content.

Chat and stop strings: they apply to the reply's content (final channel, preambles, and
plain text the model wrote without harmony), never to the reasoning (analysis channel)
or tool-call arguments. A user who sends `stop: ["\\n\\n"]` wants a one-paragraph
answer; cutting the model's thinking at its first blank line would end the request
before any answer was written.

Torch-free: the serve layer imports it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from gptoss_ray.harmony.encoding import IncrementalDecoder
from gptoss_ray.harmony.parse import Delta, HarmonyStreamParser, ToolCall
from gptoss_ray.output.stop import StopMatcher
from gptoss_ray.sampling_params import SamplingParams, TokenDelta

# (token id, {token id: logprob}) for one generated token, the sampled one in the dict
TokenLogprobs = tuple[int, dict[int, float]]


@dataclass
class SampleOutput:
    """What one engine delta became for one sample of the request."""

    index: int  # which of the request's n samples
    token_ids: list[int] = field(default_factory=list)  # tokens consumed (usage counts them)
    text: str = ""  # text mode: newly visible text
    pieces: list[Delta] = field(default_factory=list)  # chat mode: new reasoning / content / tool-call pieces
    logprobs: list[TokenLogprobs] | None = None  # newly released, when the request asked for logprobs
    # Once finished: "stop" | "length" | "tool_calls" (chat) | "abort" | "error"; the one
    # place a finish reason is decided.
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # with finish_reason "error"
    abort: bool = False  # a stop string ended it here: the engine must stop the sample
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    # vLLM's prompt_logprobs, with a sample's first output when asked for (the engine's first delta)
    prompt_logprobs: list[dict[int, float] | None] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Sample:
    """State shared by both modes: counts, the stop matcher and the finish reason."""

    def __init__(self, index: int, params: SamplingParams):
        self.index = index
        self.min_tokens = params.min_tokens
        self.matcher = StopMatcher(params.stop) if params.stop else None
        self.want_logprobs = params.logprobs is not None
        self.num_tokens = 0  # tokens consumed
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None

    def _new_output(self, delta: TokenDelta) -> SampleOutput:
        return SampleOutput(self.index, logprobs=[] if self.want_logprobs else None,
                            num_prompt_tokens=delta.num_prompt_tokens, num_cached_tokens=delta.num_cached_tokens,
                            prompt_logprobs=delta.prompt_logprobs)

    def _check(self, piece: str) -> str:
        """`piece` through the stop matcher: the part that is now visible."""
        if self.matcher is None:
            return piece
        return self.matcher.push(piece, match=self.num_tokens >= self.min_tokens)

    @property
    def stopped_by_string(self) -> bool:
        return self.matcher is not None and self.matcher.hit is not None

    def _finish(self, out: SampleOutput, delta: TokenDelta) -> None:
        if self.stopped_by_string:
            reason, stop_reason = "stop", self.matcher.hit
            out.abort = not delta.finished  # the engine is still generating this sample
        else:
            reason, stop_reason = delta.finish_reason, delta.stop_reason
            out.error = delta.error
        self.finish_reason = out.finish_reason = self._openai_reason(reason)
        self.stop_reason = out.stop_reason = stop_reason

    def _openai_reason(self, reason: str) -> str:
        return reason


class _TextSample(_Sample):
    """/v1/completions and `LLM`: the raw text of every token."""

    def __init__(self, index: int, params: SamplingParams, skip_special_tokens: bool):
        super().__init__(index, params)
        self.decoder = IncrementalDecoder(skip_special=skip_special_tokens)

    def push(self, delta: TokenDelta) -> SampleOutput:
        out = self._new_output(delta)
        parts = []
        for k, token in enumerate(delta.token_ids):
            self.num_tokens += 1
            out.token_ids.append(token)
            if out.logprobs is not None and delta.logprobs is not None:
                out.logprobs.append((token, delta.logprobs[k]))
            parts.append(self._check(self.decoder.push([token])))
            if self.stopped_by_string:
                break
        if self.stopped_by_string or delta.finished:
            if not self.stopped_by_string:  # the end: a last partial character, then what was held back
                parts.append(self._check(self.decoder.flush()))
                if self.matcher is not None:
                    parts.append(self.matcher.flush())
            self._finish(out, delta)
        out.text = "".join(parts)
        return out


class _ChatSample(_Sample):
    """/v1/chat/completions: harmony-parsed; stop strings cut the content only."""

    def __init__(self, index: int, params: SamplingParams):
        super().__init__(index, params)
        self.parser = HarmonyStreamParser()
        self._content: list[str] = []  # visible content pieces
        self._num_content_chars = 0  # content characters the parser produced (the matcher's input)
        # tokens whose logprobs wait: (position, content offset before it, token, entry)
        self._pending: deque[tuple[int, int, int, dict[int, float]]] = deque()

    @property
    def content(self) -> str:
        return "".join(self._content)

    @property
    def reasoning(self) -> str:
        return self.parser.reasoning

    @property
    def tool_calls(self) -> list[ToolCall]:
        return self.parser.tool_calls

    @property
    def num_reasoning_tokens(self) -> int:
        return self.parser.num_reasoning_tokens

    def push(self, delta: TokenDelta) -> SampleOutput:
        out = self._new_output(delta)
        for k, token in enumerate(delta.token_ids):
            self.num_tokens += 1
            out.token_ids.append(token)
            if out.logprobs is not None and delta.logprobs is not None:
                self._pending.append((self.num_tokens - 1, self._num_content_chars, token, delta.logprobs[k]))
            self._take(self.parser.feed([token]), out)
            if self.stopped_by_string:
                break
        end = self.stopped_by_string or delta.finished
        if end and not self.stopped_by_string:
            self._take(self.parser.finish(), out)
            if not self.stopped_by_string and self.matcher is not None:
                self._show(self.matcher.flush(), out)
        if out.logprobs is not None:
            self._release_logprobs(out, end)
        if end:
            self._finish(out, delta)
        return out

    def _take(self, pieces: list[Delta], out: SampleOutput) -> None:
        for piece in pieces:
            if self.stopped_by_string:
                return  # nothing after the stop string is shown
            if piece.kind == "content":
                self._num_content_chars += len(piece.text)
                self._show(self._check(piece.text), out)
            else:
                out.pieces.append(piece)

    def _show(self, text: str, out: SampleOutput) -> None:
        if text:
            self._content.append(text)
            if out.pieces and out.pieces[-1].kind == "content":
                out.pieces[-1].text += text
            else:
                out.pieces.append(Delta("content", text))

    def _release_logprobs(self, out: SampleOutput, end: bool) -> None:
        """Logprobs of content tokens, in order, once their text is shown (a token whose
        text is held back as a possible stop string waits; one past the cut never comes)."""
        shown = self.matcher.num_released if self.matcher is not None else self._num_content_chars
        cut = self.stopped_by_string
        is_content = self.parser.token_is_content
        while self._pending:
            position, offset, token, entry = self._pending[0]
            flag = is_content[position]
            if flag is None and not end:
                return  # a header's token: content or not is decided when the header ends
            if flag:
                if offset < shown or (end and not cut):
                    out.logprobs.append((token, entry))
                elif not end:
                    return
            self._pending.popleft()

    def _openai_reason(self, reason: str) -> str:
        if reason == "stop" and self.parser.tool_calls:
            return "tool_calls"
        return reason


class OutputProcessor:
    """One request's output path; see the module docstring.

    `harmony=True` parses chat channels; otherwise text mode decodes every token
    (`skip_special_tokens` as in the request)."""

    def __init__(self, params: SamplingParams, harmony: bool = False, skip_special_tokens: bool | None = None):
        skip = params.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        self.samples: list[_TextSample] | list[_ChatSample] = (
            [_ChatSample(i, params) for i in range(params.n)] if harmony
            else [_TextSample(i, params, skip) for i in range(params.n)])

    def process(self, delta: TokenDelta) -> SampleOutput | None:
        """The sample's new output, or None for what the engine sends after this
        processor ended the sample (tokens past a stop string, the abort's last delta)."""
        sample = self.samples[delta.index]
        if sample.finish_reason is not None:
            return None
        return sample.push(delta)

    def is_finished(self, index: int) -> bool:
        return self.samples[index].finish_reason is not None

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)
