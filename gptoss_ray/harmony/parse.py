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
- Each token is classified as part of the reply's text or not (`token_is_content`, what
  chat `logprobs.content` lists). Header tokens wait for the header's fate: when they
  turn out to be plain text (output without a harmony header), they count as content.

Stop strings are not matched here: the output processor (gptoss_ray/output/) cuts the
content this parser yields.
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
class HarmonyStreamParser:
    """Parse one choice's generated tokens incrementally. Never raises on model output."""

    tool_calls: list[ToolCall] = field(default_factory=list)
    num_tokens: int = 0  # tokens fed
    num_reasoning_tokens: int = 0  # tokens fed while inside an analysis message
    malformed: bool = False  # the output broke the harmony grammar at least once
    # per token fed: was it part of the reply's text (final channel, preambles, or the raw
    # fallback)? None while undecided (a header's tokens until the header ends). OpenAI's
    # chat logprobs.content lists exactly the True ones.
    token_is_content: list[bool | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        # pieces, joined on demand: appending to one str would copy it per token
        self._text: dict[str, list[str]] = {"reasoning": [], "content": []}
        self._enc = get_encoding()
        self._parser: StreamableParser | None = StreamableParser(self._enc, Role.ASSISTANT, strict=False)
        self._state = self._parser.state  # cached: see _query_state
        self._header: list[int] = []  # tokens of the header being parsed (not yet delivered)
        self._header_idx: list[int] = []  # their positions in token_is_content
        self._cur = -1  # position of the token being fed
        self._raw = IncrementalDecoder()  # decodes tokens after the grammar broke, shown as content
        self._in_call = False  # the current message is a tool call

    # --- public -------------------------------------------------------------------

    @property
    def reasoning(self) -> str:
        """Analysis channel text so far."""
        return "".join(self._text["reasoning"])

    @property
    def content(self) -> str:
        """Final channel and preamble text so far (plus the fallback text of malformed output)."""
        return "".join(self._text["content"])

    def feed(self, token_ids: Iterable[int]) -> list[Delta]:
        deltas: list[Delta] = []
        for token in token_ids:
            self.num_tokens += 1
            self._cur = len(self.token_is_content)
            self.token_is_content.append(None)
            before = self._state if self._parser is not None else None
            if self._parser is None:
                self._feed_raw(token, deltas)
            else:
                self._feed_parser(token, deltas)
            pending = self._header_idx and self._header_idx[-1] == self._cur
            if self.token_is_content[self._cur] is None and not pending:
                self.token_is_content[self._cur] = self._is_content_token(token, before)
        return self._merge(deltas)

    def finish(self) -> list[Delta]:
        """End of generation (any reason): deliver what is left and held back."""
        deltas: list[Delta] = []
        if self._parser is not None and self._header:
            if any(self._enc.is_special_token(t) for t in self._header):
                logger.debug("generation stopped inside a message header; header dropped")
                self._decide(self._header_idx, [False] * len(self._header))
            else:
                self._malformed("output ended without a harmony header")
                self._decide(self._header_idx, [True] * len(self._header))
                self._emit_text("content", self._enc.decode(self._header), deltas)
            self._header, self._header_idx = [], []
        if self._parser is None:
            self._flush_raw(deltas)
        return self._merge(deltas)

    def _decide(self, idx: list[int], flags: list[bool]) -> None:
        for i, flag in zip(idx, flags):
            self.token_is_content[i] = flag

    def _is_content_token(self, token: int, before: StreamState | None) -> bool:
        parser = self._parser
        if parser is None:  # raw fallback: everything but stop tokens is shown as content
            return token not in stop_token_ids()
        return (before == StreamState.CONTENT and self._state == StreamState.CONTENT
                and not self._in_call and parser.current_channel != "analysis")

    # --- grammar path -------------------------------------------------------------

    def _feed_parser(self, token: int, deltas: list[Delta]) -> None:
        parser = self._parser
        assert parser is not None
        before = self._state
        was_analysis = before == StreamState.CONTENT and parser.current_channel == "analysis"
        try:
            parser.process(token)
        except Exception as e:  # HarmonyError: the token breaks the grammar
            self._malformed(f"harmony parse error ({e})")
            self._enter_raw(self._header + [token], self._header_idx + [self._cur], deltas)
            return
        state = self._state = self._query_state(token, before)
        if was_analysis or (state == StreamState.CONTENT and parser.current_channel == "analysis"):
            self.num_reasoning_tokens += 1
        if state == StreamState.HEADER:
            self._header.append(token)
            self._header_idx.append(self._cur)
            if len(self._header) > MAX_HEADER_TOKENS_ANY or (
                len(self._header) > MAX_HEADER_TOKENS and not any(self._enc.is_special_token(t) for t in self._header)
            ):
                self._malformed("output is plain text without a harmony header")
                self._enter_raw(self._header, self._header_idx, deltas)
            return
        if state == StreamState.CONTENT and before != StreamState.CONTENT:  # a header just completed
            header, idx, self._header, self._header_idx = self._header, self._header_idx, [], []
            self._start_message(parser, header, idx, deltas)
            return
        if state == StreamState.EXPECT_START:
            if before == StreamState.HEADER:  # a stop token ended a header: what came was not one
                self._header_as_content(self._header, self._header_idx, deltas)
            self._in_call = False
            self._header, self._header_idx = [], []
            return
        piece = parser.last_content_delta or ""
        if piece:
            if self._in_call:
                self.tool_calls[-1].arguments += piece
                deltas.append(Delta("tool_call", piece, tool_index=len(self.tool_calls) - 1))
            else:
                kind = "reasoning" if parser.current_channel == "analysis" else "content"
                self._emit_text(kind, piece, deltas)

    def _query_state(self, token: int, before: StreamState) -> StreamState:
        """The parser's state after `token`. harmony's `state` serializes the current
        message's tokens (its cost grows with the message), so the common case is not asked:
        a plain token inside a message's content leaves it in the content."""
        if before == StreamState.CONTENT and not self._enc.is_special_token(token):
            return StreamState.CONTENT
        return self._parser.state

    def _start_message(self, parser: StreamableParser, header: list[int], idx: list[int],
                       deltas: list[Delta]) -> None:
        recipient, channel = parser.current_recipient, parser.current_channel
        header_text = self._enc.decode(header)
        # harmony's header parser is lenient: stray words become a recipient or content
        # type. A real header names a channel, and a recipient only after "to=".
        if channel not in CHANNELS or (recipient and f"to={recipient}" not in header_text):
            self._header_as_content(header, idx, deltas)
            self._decide([self._cur], [False])  # the <|message|> that closed it is not shown
            self._parser, self._in_call, self._raw = None, False, IncrementalDecoder()
            return
        self._decide(idx, [False] * len(idx))  # a real header: control text, not the reply
        self._in_call = bool(recipient)
        if recipient:
            name = recipient.removeprefix("functions.")
            call = ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", name=name)
            self.tool_calls.append(call)
            deltas.append(Delta("tool_call", "", tool_index=len(self.tool_calls) - 1, tool_id=call.id, tool_name=name))

    # --- fallback path ------------------------------------------------------------

    def _header_as_content(self, header: list[int], idx: list[int], deltas: list[Delta]) -> None:
        """A header that is not one: its words (without the role) are what the model said."""
        plain = [not self._enc.is_special_token(t) for t in header]
        first = plain.index(True) if any(plain) else -1
        if first >= 0 and self._enc.decode([header[first]]).strip() == "assistant":
            plain[first] = False  # the role name harmony put there, not the model's words
        self._decide(idx, plain)
        words = self._enc.decode([t for t in header if not self._enc.is_special_token(t)])
        words = words.strip().removeprefix("assistant").strip()
        if words:
            self._malformed(f"invalid harmony header {self._enc.decode(header)!r}")
            self._emit_text("content", words, deltas)

    def _malformed(self, why: str) -> None:
        self.malformed = True
        logger.warning("%s; returning the generated text as content", why)

    def _enter_raw(self, tokens: list[int], idx: list[int], deltas: list[Delta]) -> None:
        """The grammar broke: `tokens` (a header that was none, and the token that broke
        it) are plain text, as everything after is until the next <|start|>."""
        self._parser, self._header, self._header_idx, self._in_call = None, [], [], False
        self._raw = IncrementalDecoder()
        self._decide(idx, [t not in stop_token_ids() for t in tokens])
        cur = self._cur
        for t, self._cur in zip(tokens, idx):  # a <|start|> among them resumes parsing
            if self._parser is None:
                self._feed_raw(t, deltas)
            else:
                self._feed_parser(t, deltas)
        self._cur = cur

    def _feed_raw(self, token: int, deltas: list[Delta]) -> None:
        if token == START_TOKEN:  # the model may be back on track: resume parsing
            self._flush_raw(deltas)
            self._parser = StreamableParser(self._enc, None, strict=False)
            self._state = self._parser.state
            self._feed_parser(token, deltas)
            return
        if token not in stop_token_ids():
            self._emit_text("content", self._raw.push([token]), deltas)

    def _flush_raw(self, deltas: list[Delta]) -> None:
        self._emit_text("content", self._raw.flush(), deltas)

    # --- text plumbing ------------------------------------------------------------

    def _emit_text(self, kind: Literal["reasoning", "content"], piece: str, deltas: list[Delta]) -> None:
        if piece:
            deltas.append(Delta(kind, piece))
            self._text[kind].append(piece)

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


def parse_completion(token_ids: Sequence[int]) -> HarmonyStreamParser:
    """Parse a whole generation at once (the non-streaming path uses the same parser)."""
    parser = HarmonyStreamParser()
    parser.feed(token_ids)
    parser.finish()
    return parser
