"""The harmony encoding, loaded offline from the vocab file shipped in the package.

openai-harmony's Rust core downloads `o200k_base.tiktoken` from
openaipublic.blob.core.windows.net on first use unless the environment variable
`TIKTOKEN_ENCODINGS_BASE` names a directory that holds it. Air-gapped users of other
gpt-oss servers hunt for that file; we ship it (gptoss_ray/data/) and point the
variable there, unless the user set it on purpose. Its sha256 is checked once, so a
corrupted install fails with one clear error instead of a garbled tokenizer.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from openai_harmony import HarmonyEncoding, HarmonyEncodingName, load_harmony_encoding

from gptoss_ray.config import HARMONY_STOP_TOKEN_IDS
from gptoss_ray.errors import ConfigError

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
VOCAB_FILE = "o200k_base.tiktoken"
BASE_ENV = "TIKTOKEN_ENCODINGS_BASE"


def _expected_sha256(data_dir: Path) -> str:
    # The .sha256 file is in `sha256sum` format: "<hex>  <file name>".
    return (data_dir / f"{VOCAB_FILE}.sha256").read_text().split()[0].strip().lower()


def verify_vocab(data_dir: Path = DATA_DIR) -> str:
    """sha256 of the shipped vocab file; raises ConfigError when it is missing or altered."""
    path = data_dir / VOCAB_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: harmony vocab file missing from the package (reinstall gptoss-ray)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    expected = _expected_sha256(data_dir)
    if digest != expected:
        raise ConfigError(f"{path}: sha256 {digest} does not match the shipped {expected} (reinstall gptoss-ray)")
    return digest


@functools.cache
def get_encoding() -> HarmonyEncoding:
    """The gpt-oss harmony encoding (o200k_harmony), loaded once per process, offline."""
    if os.environ.get(BASE_ENV):
        logger.info("harmony vocab from %s=%s (set by the user)", BASE_ENV, os.environ[BASE_ENV])
    else:
        verify_vocab()
        os.environ[BASE_ENV] = str(DATA_DIR)
    try:
        return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # the Rust core raises a bare HarmonyError with the IO cause
        raise ConfigError(f"cannot load the harmony encoding from {os.environ[BASE_ENV]}: {e}") from None


def decode(token_ids: Sequence[int]) -> str:
    """Text of `token_ids`, special tokens spelled out, invalid UTF-8 replaced (never raises).

    Used for stop-string matching and as the fallback content of malformed output."""
    return get_encoding().decode(list(token_ids), errors="replace")


@functools.cache
def stop_token_ids() -> tuple[int, ...]:
    """Tokens that end an assistant turn: <|return|> (final answer) and <|call|> (tool call).
    Their home is config.HARMONY_STOP_TOKEN_IDS (the engine reads it without loading the
    tokenizer); this checks once that the tokenizer agrees."""
    found = set(get_encoding().stop_tokens_for_assistant_actions())
    if found != set(HARMONY_STOP_TOKEN_IDS):
        raise ConfigError(f"the harmony encoding's stop tokens {sorted(found)} are not "
                          f"{list(HARMONY_STOP_TOKEN_IDS)} (config.HARMONY_STOP_TOKEN_IDS)")
    return HARMONY_STOP_TOKEN_IDS


def token_bytes(token_id: int) -> bytes:
    """The raw bytes of one token (a token may hold part of a UTF-8 character)."""
    # surrogateescape maps each invalid byte to a lone surrogate and back, losslessly
    return get_encoding().decode([token_id], errors="surrogateescape").encode("utf-8", "surrogateescape")


class IncrementalDecoder:
    """Token ids in, text out, never splitting a UTF-8 character across two pieces.

    Linear in the output length (each token is decoded once), unlike re-decoding the
    whole output per step. `skip_special` drops harmony's control tokens (<|start|>, ...)."""

    def __init__(self, skip_special: bool = False):
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._skip_special = skip_special

    def push(self, token_ids: Sequence[int]) -> str:
        enc = get_encoding()
        data = b"".join(
            token_bytes(t) for t in token_ids if not (self._skip_special and enc.is_special_token(t))
        )
        return self._utf8.decode(data)

    def flush(self) -> str:
        """What is left at the end (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
