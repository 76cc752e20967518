"""Incremental harmony parser: generated token ids -> reasoning / content / tool-call deltas.

openai-harmony's `StreamableParser` does the grammar; this wraps it so that the server
can never fail on what the model wrote:
- analysis channel -> reasoning; final channel and recipient-less commentary
  (preambles) -> content; any message with a recipient (`to=functions.NAME`) -> a tool
  call whose JSON arguments stream as pieces.
- Output that breaks the grammar is not an error: the tokens not yet delivered are
  decoded and returned as content (with a logged warning), and parsing resumes at the
  next `<|start|>` if the model gets back on track.
- A stop in the middle of a message (max_tokens, stop string) keeps what was parsed; a
  header cut short is dropped.
- Stop strings: text that may be the start of a stop string is held back until it is
  known not to be one, and the text is cut where a stop string begins, so streamed and
  non-streamed replies agree.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from openai_harmony import Role, StreamableParser, StreamState

from gptoss_ray.harmony.encoding import IncrementalDecoder, get_encoding, stop_token_ids

logger = logging.getLogger(__name__)

START_TOKEN = 200006  # <|start|>
CHANNELS = ("analysis", "commentary", "final")
# A header longer than this with no special token is not a header: the model is
# writing plain text, which we hand back as content instead of waiting for EOS.
MAX_HEADER_TOKENS = 32
# No header is longer than this even with special tokens in it (a real one, with a
# recipient and a constraint, is under 20): past it the model is off the grammar, and
# waiting for <|message|> would swallow the rest of the output.
MAX_HEADER_TOKENS_ANY = 128


@dataclass
class Delta:
    """One piece of parsed output, in generation order."""

    kind: Literal["reasoning", "content", "tool_call"]
    text: str = ""  # reasoning/content text, or a piece of a tool call's JSON arguments
    tool_index: int | None = None  # which tool call of this choice (0, 1, ...)
    tool_id: str | None = None  # set on the first delta of a tool call only
    tool_name: str | None = None  # set on the first delta of a tool call only


@dataclass
class ToolCall:
    id: str  # "call_<hex>", what the client echoes back as tool_call_id
    name: str  # function name without the "functions." namespace
    arguments: str = ""  # JSON text as the model wrote it


@dataclass
class StopFilter:
    """Holds back text that could begin a stop string; cuts at a complete one."""

    stops: Sequence[str]
    text: str = ""  # everything received
    sent: int = 0  # characters of `text` already released
    hit: bool = False  # a stop string was found: nothing more is released

    def push(self, piece: str) -> str:
        if self.hit:
            return ""
        self.text += piece
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0),
                  default=-1)
        if cut >= 0:
            self.hit = True
            out, self.sent = self.text[self.sent:cut], cut
            return out
        safe = len(self.text)
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    safe = min(safe, len(self.text) - k)
                    break
        out, self.sent = self.text[self.sent:safe], max(self.sent, safe)
        return out

    def flush(self) -> str:
        """At the end: release the held-back tail (it never became a stop string)."""
        if self.hit:
            return ""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


@dataclass
class HarmonyStreamParser:
    """Parse one choice's generated tokens incrementally. Never raises on model output."""

    stop: Sequence[str] = ()  # stop strings, applied to reasoning and content text
    reasoning: str = ""  # analysis channel text so far
    content: str = ""  # final channel text so far (plus fallback text of malformed output)
    tool_calls: list[ToolCall] = field(default_factory=list)
    num_tokens: int = 0  # tokens fed
    num_reasoning_tokens: int = 0  # tokens fed while inside an analysis message
    malformed: bool = False  # the output broke the harmony grammar at least once
    # per token fed: was it part of the reply's text (final channel, or the raw fallback)?
    # OpenAI's chat logprobs.content lists exactly those tokens.
    token_is_content: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._enc = get_encoding()
        self._parser: StreamableParser | None = StreamableParser(self._enc, Role.ASSISTANT, strict=False)
        self._header: list[int] = []  # tokens of the header being parsed (not yet delivered)
        self._raw = IncrementalDecoder()  # decodes tokens after the grammar broke, shown as content
        self._in_call = False  # the current message is a tool call
        self._filters = {k: StopFilter(list(self.stop)) for k in ("reasoning", "content")}

    # --- public -------------------------------------------------------------------

    def feed(self, token_ids: Iterable[int]) -> list[Delta]:
        deltas: list[Delta] = []
        for token in token_ids:
            self.num_tokens += 1
            before = self._parser.state if self._parser is not None else None
            if self._parser is None:
                self._feed_raw(token, deltas)
            else:
                self._feed_parser(token, deltas)
            self.token_is_content.append(self._is_content_token(token, before))
        return self._merge(deltas)

    def finish(self) -> list[Delta]:
        """End of generation (any reason): deliver what is left and held back."""
        deltas: list[Delta] = []
        if self._parser is not None and self._header:
            if any(self._enc.is_special_token(t) for t in self._header):
                logger.debug("generation stopped inside a message header; header dropped")
            else:
                self._malformed("output ended without a harmony header")
                self._emit_text("content", self._enc.decode(self._header), deltas)
            self._header = []
        if self._parser is None:
            self._flush_raw(deltas)
        for kind, filt in self._filters.items():
            tail = filt.flush()
            if tail:
                deltas.append(Delta(kind, tail))
                self._append(kind, tail)
        return self._merge(deltas)

    @property
    def stopped_by_string(self) -> bool:
        return any(f.hit for f in self._filters.values())

    def _is_content_token(self, token: int, before: StreamState | None) -> bool:
        parser = self._parser
        if parser is None:  # raw fallback: everything but stop tokens is shown as content
            return token not in stop_token_ids()
        return (before == StreamState.CONTENT and parser.state == StreamState.CONTENT
                and not self._in_call and parser.current_channel != "analysis")

    # --- grammar path -------------------------------------------------------------

    def _feed_parser(self, token: int, deltas: list[Delta]) -> None:
        parser = self._parser
        assert parser is not None
        before = parser.state
        was_analysis = before == StreamState.CONTENT and parser.current_channel == "analysis"
        try:
            parser.process(token)
        except Exception as e:  # HarmonyError: the token breaks the grammar
            self._malformed(f"harmony parse error ({e})")
            self._enter_raw(self._header + [token], deltas)
            return
        state = parser.state
        if was_analysis or (state == StreamState.CONTENT and parser.current_channel == "analysis"):
            self.num_reasoning_tokens += 1
        if state == StreamState.HEADER:
            self._header.append(token)
            if len(self._header) > MAX_HEADER_TOKENS_ANY or (
                len(self._header) > MAX_HEADER_TOKENS and not any(self._enc.is_special_token(t) for t in self._header)
            ):
                self._malformed("output is plain text without a harmony header")
                self._enter_raw(self._header, deltas)
            return
        if state == StreamState.CONTENT and before != StreamState.CONTENT:  # a header just completed
            header, self._header = self._header, []
            self._start_message(parser, header, deltas)
            return
        if state == StreamState.EXPECT_START:
            if before == StreamState.HEADER:  # a stop token ended a header: what came was not one
                self._header_as_content(self._header, deltas)
            self._in_call = False
            self._header = []
            return
        piece = parser.last_content_delta or ""
        if piece:
            if self._in_call:
                self.tool_calls[-1].arguments += piece
                deltas.append(Delta("tool_call", piece, tool_index=len(self.tool_calls) - 1))
            else:
                kind = "reasoning" if parser.current_channel == "analysis" else "content"
                self._emit_text(kind, piece, deltas)

    def _start_message(self, parser: StreamableParser, header: list[int], deltas: list[Delta]) -> None:
        recipient, channel = parser.current_recipient, parser.current_channel
        header_text = self._enc.decode(header)
        # harmony's header parser is lenient: stray words become a recipient or content
        # type. A real header names a channel, and a recipient only after "to=".
        if channel not in CHANNELS or (recipient and f"to={recipient}" not in header_text):
            self._header_as_content(header, deltas)
            self._parser, self._in_call, self._raw = None, False, IncrementalDecoder()
            return
        self._in_call = bool(recipient)
        if recipient:
            name = recipient.removeprefix("functions.")
            call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
            self.tool_calls.append(call)
            deltas.append(Delta("tool_call", "", tool_index=len(self.tool_calls) - 1, tool_id=call.id, tool_name=name))

    # --- fallback path ------------------------------------------------------------

    def _header_as_content(self, header: list[int], deltas: list[Delta]) -> None:
        """A header that is not one: its words (without the role) are what the model said."""
        words = self._enc.decode([t for t in header if not self._enc.is_special_token(t)])
        words = words.strip().removeprefix("assistant").strip()
        if words:
            self._malformed(f"invalid harmony header {self._enc.decode(header)!r}")
            self._emit_text("content", words, deltas)

    def _malformed(self, why: str) -> None:
        self.malformed = True
        logger.warning("%s; returning the generated text as content", why)

    def _enter_raw(self, tokens: list[int], deltas: list[Delta]) -> None:
        self._parser, self._header, self._in_call = None, [], False
        self._raw = IncrementalDecoder()
        for t in tokens:
            self._feed_raw(t, deltas)

    def _feed_raw(self, token: int, deltas: list[Delta]) -> None:
        if token == START_TOKEN:  # the model may be back on track: resume parsing
            self._flush_raw(deltas)
            self._parser = StreamableParser(self._enc, None, strict=False)
            self._feed_parser(token, deltas)
            return
        if token not in stop_token_ids():
            self._emit_text("content", self._raw.push([token]), deltas)

    def _flush_raw(self, deltas: list[Delta]) -> None:
        self._emit_text("content", self._raw.flush(), deltas)

    # --- text plumbing ------------------------------------------------------------

    def _emit_text(self, kind: Literal["reasoning", "content"], piece: str, deltas: list[Delta]) -> None:
        if not piece:
            return
        out = self._filters[kind].push(piece)
        if out:
            deltas.append(Delta(kind, out))
            self._append(kind, out)

    def _append(self, kind: str, text: str) -> None:
        if kind == "reasoning":
            self.reasoning += text
        else:
            self.content += text

    @staticmethod
    def _merge(deltas: list[Delta]) -> list[Delta]:
        """Join consecutive text pieces of the same kind (and argument pieces of the same call)."""
        out: list[Delta] = []
        for d in deltas:
            prev = out[-1] if out else None
            if (prev is not None and prev.kind == d.kind and d.tool_id is None
                    and prev.tool_index == d.tool_index):
                prev.text += d.text
            else:
                out.append(Delta(d.kind, d.text, d.tool_index, d.tool_id, d.tool_name))
        return out


def parse_completion(token_ids: Sequence[int], stop: Sequence[str] = ()) -> HarmonyStreamParser:
    """Parse a whole generation at once (the non-streaming path uses the same parser)."""
    parser = HarmonyStreamParser(stop=stop)
    parser.feed(token_ids)
    parser.finish()
    return parser
