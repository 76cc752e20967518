"""The side-by-side peer: an OpenAI-compatible chat server over transformers `generate`.

    python benchmarks/peer_server.py --port 8100 [--model CHECKPOINT_DIR] [--max-batch-size 8]

`transformers serve` would be the natural peer, but it loads the tokenizer and chat
template from the checkpoint directory, and gpt-oss checkpoints written here (and the
demo one) carry none: it fails with "Unrecognized processing class". So this is the
plain loop people write first: FastAPI + uvicorn, one `generate` call at a time over a
*static batch* (the requests waiting when the previous batch ended, up to
--max-batch-size; 1 = one request at a time). A batch runs until its longest request is
done; requests that arrive meanwhile wait for the next batch. That is the baseline a
continuous-batching engine should beat, and the comparison is honest only if the rest
is the same, so the peer renders prompts and parses replies with gptoss_ray's harmony
code, exactly as the real server does, and counts usage the same way. Routes:
/v1/chat/completions, /v1/completions (one text prompt), /v1/models, /health.

Limits, on purpose: one sampling setting per batch (the first request's temperature and
top_p), no tools, no stop strings, no n > 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, GenerationConfig, Mxfp4Config, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from gptoss_ray.harmony.encoding import IncrementalDecoder, stop_token_ids
from gptoss_ray.harmony.parse import HarmonyStreamParser
from gptoss_ray.harmony.render import encode_text, render_chat

logger = logging.getLogger("peer_server")
PAD_TOKEN_ID = 199999  # <|endoftext|>, the checkpoints' pad_token_id


@dataclass
class PendingRequest:
    """One chat request between the HTTP handler and the generate thread."""

    prompt_ids: list[int]  # rendered harmony prompt
    max_tokens: int  # stop after this many generated tokens
    min_tokens: int  # stop tokens before this many do not end the request
    ignore_eos: bool  # stop tokens never end the request
    temperature: float  # 0 = greedy
    top_p: float
    loop: asyncio.AbstractEventLoop  # the server's loop, to hand tokens back thread-safely
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ints, then a finish_reason str
    output_ids: list[int] = field(default_factory=list)  # generated so far (generate thread only)
    finished: bool = False  # set by the generate thread, or by the handler when the client left

    def emit(self, item) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class _BatchStreamer(BaseStreamer):
    """Receives each step's [B] new tokens from `generate` and routes them per request."""

    def __init__(self, batch: list[PendingRequest], stops: frozenset[int]):
        self.batch, self.stops, self.seen_prompt = batch, stops, False

    def put(self, value: torch.Tensor) -> None:
        if not self.seen_prompt:  # generate first puts the prompt ids
            self.seen_prompt = True
            return
        for req, token in zip(self.batch, value.reshape(-1).tolist()):
            if req.finished:
                continue
            req.output_ids.append(token)
            n = len(req.output_ids)
            if token in self.stops and not req.ignore_eos and n >= req.min_tokens:
                req.finished = True  # the stop token itself is not output, as in the real server
                req.emit("stop")
                continue
            req.emit(token)
            if n >= req.max_tokens:
                req.finished = True
                req.emit("length")

    def end(self) -> None:
        for req in self.batch:
            if not req.finished:
                req.finished = True
                req.emit("length")


class _AllFinished(StoppingCriteria):
    """Per-row done flags, so generate ends once every request of the batch is done."""

    def __init__(self, batch: list[PendingRequest]):
        self.batch = batch

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.tensor([r.finished for r in self.batch], dtype=torch.bool, device=input_ids.device)


class StaticBatcher:
    """Runs `generate` on one thread over batches of the requests waiting at the time."""

    def __init__(self, model, max_batch_size: int):
        self.model, self.max_batch_size = model, max_batch_size
        self.waiting: asyncio.Queue[PendingRequest] = asyncio.Queue()
        self.stops = frozenset(stop_token_ids())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.num_batches = 0

    async def loop_forever(self) -> None:
        while True:
            batch = [await self.waiting.get()]
            while len(batch) < self.max_batch_size and not self.waiting.empty():
                batch.append(self.waiting.get_nowait())
            batch = [r for r in batch if not r.finished]  # clients that left while waiting
            if batch:
                self.num_batches += 1
                await asyncio.get_running_loop().run_in_executor(self.executor, self._generate, batch)

    def _generate(self, batch: list[PendingRequest]) -> None:
        width = max(len(r.prompt_ids) for r in batch)
        # Left padding: every row's next token is at the same position.
        ids = torch.tensor([[PAD_TOKEN_ID] * (width - len(r.prompt_ids)) + r.prompt_ids for r in batch])  # [B, S]
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch])  # [B, S]
        first = batch[0]
        config = GenerationConfig(
            max_new_tokens=max(r.max_tokens for r in batch), do_sample=first.temperature > 0,
            temperature=first.temperature or None, top_p=first.top_p if first.temperature > 0 else None,
            top_k=None, pad_token_id=PAD_TOKEN_ID, eos_token_id=None,  # stops are per request, above
        )
        try:
            with torch.inference_mode():
                self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                                    streamer=_BatchStreamer(batch, self.stops),
                                    stopping_criteria=StoppingCriteriaList([_AllFinished(batch)]))
        except Exception:
            logger.exception("generate failed for a batch of %d", len(batch))
            for r in batch:
                if not r.finished:
                    r.finished = True
                    r.emit("error")


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


def _prompt_ids(body: dict, chat: bool) -> list[int]:
    """The chat rendered as harmony, or the raw completion prompt's tokens, as the real server does."""
    if not chat:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("prompt must be a non-empty string (this peer takes one text prompt)", "prompt")
        return encode_text(prompt)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list", "messages")
    try:
        return render_chat(messages).token_ids
    except Exception as e:  # RenderError and malformed messages alike are the client's
        raise ValueError(str(e), "messages") from None


def _parse(body: dict, chat: bool, loop: asyncio.AbstractEventLoop) -> PendingRequest:
    """The fields this peer honours; ValueError(message, param) for anything invalid."""
    prompt = _prompt_ids(body, chat)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 256 if chat else 16))
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError("max_tokens must be a positive integer", "max_tokens")
    min_tokens = body.get("min_tokens", 0)
    temperature = body.get("temperature", 1.0)
    top_p = body.get("top_p", 1.0)
    if not isinstance(min_tokens, int) or not 0 <= min_tokens <= max_tokens:
        raise ValueError("min_tokens must be an integer in [0, max_tokens]", "min_tokens")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
        raise ValueError("temperature must be in [0, 2]", "temperature")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError("top_p must be in (0, 1]", "top_p")
    return PendingRequest(prompt, max_tokens, min_tokens, bool(body.get("ignore_eos", False)),
                          float(temperature), float(top_p), loop)


def build_app(batcher: StaticBatcher, model_name: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.loop_forever())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.get("/health")
    async def health():
        return {"status": "ok", "batches": batcher.num_batches}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "owned_by": "peer"}]}

    async def handle(request: Request, chat: bool):
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object")
        try:
            req = _parse(body, chat, asyncio.get_running_loop())
        except ValueError as e:
            return _error(400, *e.args)
        await batcher.waiting.put(req)
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_name}
        text = _ChatText() if chat else _RawText()
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_stream(req, meta, usage, text), media_type="text/event-stream")
        return await _complete(req, meta, text)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    return app


def _usage(req: PendingRequest, n_out: int) -> dict:
    return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n_out,
            "total_tokens": len(req.prompt_ids) + n_out}


class _ChatText:
    """Chat replies: harmony-parsed, streamed as `delta` objects."""

    object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self):
        self.parser = HarmonyStreamParser()

    def push(self, token: int | None) -> dict:
        """Delta fields for one token (None = the end of generation)."""
        deltas = self.parser.finish() if token is None else self.parser.feed([token])
        out: dict = {}
        for d in deltas:  # tool calls are not served by the peer; their text stays out
            key = {"reasoning": "reasoning_content", "content": "content"}.get(d.kind)
            if key:
                out[key] = out.get(key, "") + d.text
        return out

    def first_chunk_choice(self) -> dict | None:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def chunk_choice(self, fields: dict, finish: str | None) -> dict:
        return {"index": 0, "delta": fields, "finish_reason": finish}

    def final_choice(self, finish: str) -> dict:
        message = {"role": "assistant", "content": self.parser.content}
        if self.parser.reasoning:
            message["reasoning_content"] = self.parser.reasoning
        return {"index": 0, "message": message, "finish_reason": finish}


class _RawText:
    """Raw completions: every token's text as it comes, no parsing."""

    object, chunk_object = "text_completion", "text_completion"

    def __init__(self):
        self.decoder, self.text = IncrementalDecoder(), ""

    def push(self, token: int | None) -> dict:
        piece = self.decoder.flush() if token is None else self.decoder.push([token])
        self.text += piece
        return {"text": piece} if piece else {}

    def first_chunk_choice(self) -> dict | None:
        return None

    def chunk_choice(self, fields: dict, finish: str | None) -> dict:
        return {"index": 0, "text": fields.get("text", ""), "finish_reason": finish, "logprobs": None}

    def final_choice(self, finish: str) -> dict:
        return {"index": 0, "text": self.text, "finish_reason": finish, "logprobs": None}


async def _tokens(req: PendingRequest):
    """Generated tokens, then the finish reason (str); marks the request finished on exit,
    so a client that disconnects stops costing its row anything but padding."""
    try:
        while True:
            item = await req.events.get()
            yield item
            if isinstance(item, str):
                return
    finally:
        req.finished = True


def _sse(meta: dict, text, choices: list, **extra) -> str:
    return "data: " + json.dumps({**meta, "object": text.chunk_object, "choices": choices, **extra}) + "\n\n"


async def _stream(req: PendingRequest, meta: dict, include_usage: bool, text):
    n_out = 0
    first = text.first_chunk_choice()
    if first:
        yield _sse(meta, text, [first])
    async for item in _tokens(req):
        finish = item if isinstance(item, str) else None
        n_out += finish is None
        fields = text.push(None if finish else item)
        if finish == "error":
            yield "data: " + json.dumps({"error": {"message": "generation failed", "code": 500}}) + "\n\n"
        elif fields or finish:
            yield _sse(meta, text, [text.chunk_choice(fields, finish)])
    if include_usage:
        yield _sse(meta, text, [], usage=_usage(req, n_out))
    yield "data: [DONE]\n\n"


async def _complete(req: PendingRequest, meta: dict, text) -> JSONResponse:
    n_out, finish = 0, "length"
    async for item in _tokens(req):
        if isinstance(item, str):
            finish = item
            text.push(None)
        else:
            n_out += 1
            text.push(item)
    if finish == "error":
        return _error(500, "generation failed")
    return JSONResponse({**meta, "object": text.object, "choices": [text.final_choice(finish)],
                         "usage": _usage(req, n_out)})


def load_model(path: str, threads: int):
    torch.set_num_threads(threads)
    # transformers wants `accelerate` for MXFP4 unless told to dequantize on load, which is
    # what it does on CPU anyway; the weights are then dense float32 like the real server's.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 quantization_config=Mxfp4Config(dequantize=True))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint directory (default: the demo checkpoint)")
    p.add_argument("--served-model-name", default=None, help="the model id /v1/models lists (default: --model)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--max-batch-size", type=int, default=8, help="static batch size; 1 = one request at a time")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Random demo weights write no harmony header, so the parser would warn on every request.
    logging.getLogger("gptoss_ray.harmony.parse").setLevel(logging.ERROR)
    if args.model is None:
        from gptoss_ray.checkpoint.write import default_demo_checkpoint

        args.model = str(default_demo_checkpoint())
    batcher = StaticBatcher(load_model(args.model, args.threads), args.max_batch_size)
    app = build_app(batcher, args.served_model_name or args.model)
    logger.info("peer server on http://127.0.0.1:%d/v1 (static batches of <= %d, %d torch thread(s))",
                args.port, args.max_batch_size, args.threads)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
