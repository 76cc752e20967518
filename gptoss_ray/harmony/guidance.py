"""llguidance over the o200k_harmony vocabulary: the tokenizer adapter, compiled grammars, checks.

Why llguidance (measured on this vocabulary, see benchmarks/RESULTS.md "Constrained decoding"):
- Its Lark dialect names harmony's special tokens (`<|channel|>`, `<|call|>`) and inlines
  JSON schemas (`%json {...}`), so the whole assistant turn, channels and all, is one
  grammar; xgrammar's EBNF works on text and needs structural tags for special tokens.
- A rule can carry `max_tokens=N`: the analysis channel's reasoning budget is one grammar
  attribute. xgrammar has no per-rule token budget; the engine would have to switch grammars
  when the budget ran out.
- Compiling is lazy (lexer states are built as the mask needs them): ~5 ms per schema
  here against ~60 ms for xgrammar's eager JSON-schema compile; the per-step mask costs
  about the same (~0.1 ms per row on this CPU). Building the tokenizer adapter costs
  ~3 s once per process (xgrammar's: ~1.5 s), paid at the first constrained request.

The tokenizer is built offline from the vendored vocab file (gptoss_ray/data) and the
harmony special tokens, never from the hub. EOS for llguidance is `<|return|>`, which
the demo and real gpt-oss configs also name as EOS: a bare-JSON grammar (completions)
then ends on it. Torch-free: the serve layer validates grammars with it, the engine's
workers build matchers from it.
"""

from __future__ import annotations

import base64
import concurrent.futures
import functools
import hashlib
import re
import threading
from collections import OrderedDict

import llguidance

from gptoss_ray.config import HARMONY_RETURN_ID, HARMONY_VOCAB_SIZE
from gptoss_ray.errors import GptOssError
from gptoss_ray.harmony.encoding import DATA_DIR, VOCAB_FILE, get_encoding, verify_vocab

RETURN_TOKEN = HARMONY_RETURN_ID  # <|return|>
# o200k's pre-tokenizer split (tiktoken's o200k_base pattern); llguidance uses it to
# tokenize the text a grammar forces, canonically.
O200K_PATTERN = "|".join([
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
CACHE_SIZE = 256  # compiled grammars kept per process
# Bounds on what one grammar may cost (llguidance's parser limits): beyond them the
# matcher errors out instead of stalling a step. Defaults of llguidance, named here.
LIMITS = dict(step_lexer_fuel=200_000, step_max_items=50_000, max_grammar_size=500_000)


class GrammarError(GptOssError, ValueError):
    """A grammar (from a schema or tool list) that cannot be compiled: HTTP 400."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@functools.cache
def tokenizer() -> llguidance.LLTokenizer:
    """The llguidance tokenizer for o200k_harmony, built once per process (~3 s)."""
    verify_vocab()
    ranks: dict[bytes, int] = {}
    with open(DATA_DIR / VOCAB_FILE, "rb") as f:
        for line in f:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    enc = get_encoding()
    special = {t: enc.encode(t, allowed_special="all")[0] for t in enc.special_tokens_set}
    special = {t: i for t, i in special.items() if i < HARMONY_VOCAB_SIZE}  # one reserved id lies past the vocab
    return llguidance.LLTokenizer.from_tiktoken(encoder=ranks, special_tokens=special, pattern=O200K_PATTERN,
                                                eos_token=RETURN_TOKEN, n_vocab=HARMONY_VOCAB_SIZE)


def _limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**LIMITS, verbose_errors=False)


class _Compiled:
    """Pristine matchers by grammar hash (LRU): a sequence gets a deep copy, so a grammar
    is compiled once per process however many requests use it."""

    def __init__(self, size: int = CACHE_SIZE):
        self.size = size
        self.items: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, grammar: str) -> llguidance.LLMatcher:
        key = hashlib.sha256(grammar.encode()).hexdigest()
        with self.lock:
            m = self.items.get(key)
            if m is not None:
                self.items.move_to_end(key)
                return m.deep_copy()
        m = llguidance.LLMatcher(tokenizer(), grammar, log_level=0, limits=_limits())
        if m.is_error():
            raise GrammarError(_clean(m.get_error()))
        with self.lock:
            self.items[key] = m
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return m.deep_copy()


_compiled = _Compiled()


def matcher(grammar: str) -> llguidance.LLMatcher:
    """A fresh matcher at the start of `grammar` (compiled on first use, then copied)."""
    return _compiled.get(grammar)


def _clean(error: str) -> str:
    # llguidance errors carry the grammar excerpt on following lines; the first names the problem.
    first = error.strip().splitlines()[0] if error.strip() else "invalid grammar"
    return re.sub(r"^at \d+\(\d+\): ", "", first)


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-check")


def check(grammar: str, timeout_s: float = 5.0) -> None:
    """Raise GrammarError unless `grammar` compiles within `timeout_s` (the compiled matcher
    is cached for the engine in this process). A compile that outlives the timeout runs on
    in its thread, bounded by LIMITS, but the request gets its 400 now. The tokenizer's
    one-time build (~3 s) is not part of the timeout."""
    tokenizer()
    future = _pool.submit(matcher, grammar)
    try:
        future.result(timeout=timeout_s)
    except concurrent.futures.TimeoutError:
        raise GrammarError(f"the schema took longer than {timeout_s:g} s to compile; simplify it") from None
