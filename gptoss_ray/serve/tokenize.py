"""POST /tokenize and /detokenize, GET /version: vLLM's utility routes, same shapes.

/tokenize takes raw text (`prompt`, tokenized as /v1/completions does) or a chat
(`messages`, rendered to harmony as /v1/chat/completions does; without
`add_generation_prompt` the trailing `<|start|>assistant` is left off). Both answer
`{count, max_model_len, tokens}`. GET /tokenizer_info names the special tokens.
/detokenize decodes with the same harmony decoder
every response uses (special tokens spelled out, invalid UTF-8 replaced).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi.responses import JSONResponse

from gptoss_ray.config import HARMONY_VOCAB_SIZE
from gptoss_ray.harmony.encoding import decode, get_encoding
from gptoss_ray.harmony.render import RenderError, encode_text, render_chat
from gptoss_ray.serve.engine_client import ServingContext
from gptoss_ray.serve.errors import OpenAIError
from gptoss_ray.serve.protocol import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest

GENERATION_PROMPT = "<|start|>assistant"


def _check_model(ctx: ServingContext, model: str | None) -> None:
    if model is not None:  # optional here, as in vLLM
        ctx.check_model(model)


async def tokenize(ctx: ServingContext, req: TokenizeCompletionRequest | TokenizeChatRequest) -> Any:
    _check_model(ctx, req.model)
    if isinstance(req, TokenizeChatRequest):
        try:
            tokens = render_chat(
                [m.model_dump(exclude_none=True) for m in req.messages],
                tools=[t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                reasoning_effort=req.reasoning_effort or ctx.config.default_reasoning_effort,
            ).token_ids
        except RenderError as e:
            raise OpenAIError(400, str(e), param=e.param) from None
        suffix = get_encoding().encode(GENERATION_PROMPT, allowed_special="all")
        if not req.add_generation_prompt and tokens[-len(suffix):] == suffix:
            tokens = tokens[: -len(suffix)]
    else:
        tokens = encode_text(req.prompt)
    body: dict[str, Any] = {"count": len(tokens), "max_model_len": await ctx.max_model_len(), "tokens": tokens}
    if req.return_token_strs:
        body["token_strs"] = [decode([t]) for t in tokens]
    return JSONResponse(body)


async def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> Any:
    _check_model(ctx, req.model)
    if any(not 0 <= t < HARMONY_VOCAB_SIZE for t in req.tokens):
        raise OpenAIError(400, f"token ids must be in [0, {HARMONY_VOCAB_SIZE})", param="tokens")
    try:
        text = decode(req.tokens)
    except Exception:  # ids inside the vocab size that the encoding never assigned
        raise OpenAIError(400, "tokens hold ids the tokenizer does not know", param="tokens") from None
    return JSONResponse({"prompt": text})


async def tokenizer_info(ctx: ServingContext) -> Any:
    """vLLM's GET /tokenizer_info: the tokenizer's special tokens, as gpt-oss's
    tokenizer_config.json names them. lm-eval-harness's `remote` tokenizer reads it, then
    tokenizes through /tokenize and /detokenize: no tokenizer files on the client."""
    return JSONResponse({"tokenizer_class": "o200k_harmony", "eos_token": "<|return|>", "bos_token": None,
                         "pad_token": "<|endoftext|>", "model_max_length": await ctx.max_model_len(),
                         "chat_template": None})


def server_version() -> str:
    try:
        return version("gptoss-ray")
    except PackageNotFoundError:  # run from a source tree
        return "0.0.0+source"
