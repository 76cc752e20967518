"""The real Serve app on the real engine and the tiny demo checkpoint, through the openai
client: chat streamed and not, and a client that leaves mid-stream frees its KV blocks;
the prompt's logprobs (echo + logprobs + max_tokens 0), and lm-eval-harness's
`local-completions` model running a loglikelihood task against the server, offline."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from gptoss_ray.engine_api import EngineStats
from gptoss_ray.harmony.encoding import decode
from gptoss_ray.harmony.render import encode_text, render_chat
from gptoss_ray.serve.testing import local_serve_app

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]
MODEL = "gpt-oss-tiny-demo"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def demo_checkpoint():
    from gptoss_ray.checkpoint import default_demo_checkpoint

    return default_demo_checkpoint()


@pytest.fixture(scope="module")
def app():
    engine = {"model": str(demo_checkpoint()), "dtype": "float32", "device": "cpu", "block_size": 16,
              "num_kv_blocks": 256, "max_model_len": 4096, "max_num_seqs": 4, "worker_num_cpus": 0.1}
    with local_serve_app({"engine": engine, "served_model_name": MODEL}, app_name="real") as url:
        from ray import serve

        yield url, serve.get_deployment_handle("LLMServer", app_name="real")


@pytest.fixture
def client(app):
    return openai.OpenAI(base_url=app[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_chat_streamed_and_not_agree(client):
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.0, seed=0)
    r = client.chat.completions.create(logprobs=True, **kw)
    choice = r.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert r.usage.prompt_tokens == len(render_chat(MESSAGES).token_ids)
    assert 1 <= r.usage.completion_tokens <= 12 and len(choice.logprobs.content) <= r.usage.completion_tokens
    text = (getattr(choice.message, "reasoning_content", None) or "") + (choice.message.content or "")
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    streamed = "".join((getattr(c.choices[0].delta, "reasoning_content", None) or "") + (c.choices[0].delta.content or "")
                       for c in chunks if c.choices)
    assert streamed == text  # greedy: the same tokens, parsed the same way
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_on_token_ids(client):
    r = client.completions.create(model=MODEL, prompt=[200006, 1428, 200008], max_tokens=5, temperature=0.0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def stats(app) -> EngineStats:
    return app[1].stats.remote().result()


def aborted(app) -> float:
    text = httpx.get(app[0] + "/metrics", timeout=30).text
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("gptoss:requests_aborted_total"))


def test_disconnect_mid_stream_frees_kv_blocks(app):
    idle, aborted_before = stats(app), aborted(app)
    assert idle.num_free_blocks == idle.num_total_blocks
    # 3500 tokens would take minutes on this CPU: blocks freed in the wait below were freed by the abort.
    # min_tokens bans the harmony stop tokens (<|return|>, <|call|>) that the random model
    # may sample at any step (ignore_eos alone leaves them in force), so the stream is long.
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3500, "min_tokens": 3500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", app[0] + "/v1/chat/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        events = [line for line in (next(lines) for _ in range(12)) if line.startswith("data: ")]
        busy = stats(app)  # mid-generation: the request holds blocks
        assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"
    assert busy.num_running == 1 and busy.num_free_blocks < busy.num_total_blocks
    end = time.monotonic() + 30  # bounds a hang only; the abort itself is immediate
    while time.monotonic() < end:
        now = stats(app)
        if now.num_running == 0 and now.num_free_blocks == now.num_total_blocks:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"blocks not freed after the client left: {now}")
    assert aborted(app) == aborted_before + 1


def test_responses_api_on_the_demo_engine(client):
    """Every Responses helper of the openai client parses what the real engine's output
    (random tokens: often not harmony at all) becomes; greedy streamed = non-streamed."""
    kw = dict(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0.0,
              include=["message.output_text.logprobs"], top_logprobs=1)
    r = client.responses.create(**kw)
    assert r.status in ("completed", "incomplete") and 1 <= r.usage.output_tokens <= 12
    assert r.usage.input_tokens == len(render_chat(MESSAGES).token_ids)

    def text_of(response) -> str:
        parts = []
        for item in response.output:
            if item.type == "reasoning":
                parts += [c.text for c in item.content or []]
            elif item.type == "message":
                parts += [c.text for c in item.content]
            elif item.type == "function_call":
                parts.append(item.name + item.arguments)
        return "".join(parts)

    events = list(client.responses.create(stream=True, **kw))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert text_of(final) == text_of(r) and final.usage.output_tokens == r.usage.output_tokens
    with client.responses.stream(**kw) as stream:
        last = list(stream)[-1]  # the helper's get_final_response() exists for `completed` only
    assert last.type == f"response.{r.status}" and text_of(last.response) == text_of(r)
    assert client.responses.retrieve(r.id).usage.output_tokens == r.usage.output_tokens
    assert [i.type for i in client.responses.input_items.list(r.id).data] == ["message"]
    again = client.responses.create(model=MODEL, input="Again.", previous_response_id=r.id, max_output_tokens=2)
    assert again.usage.input_tokens > r.usage.input_tokens
    assert again.usage.input_tokens_details.cached_tokens >= 16  # the shared prefix came from the prefix cache
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_prompt_logprobs_as_lm_eval_asks_for_them(client):
    """The request lm-eval-harness makes for a loglikelihood: token ids, echo, logprobs=1,
    max_tokens 0; each prompt token's logprob is the model's, recomputed here."""
    from support.engine_helpers import logsoftmax_by_recompute

    ids = encode_text("The quick brown fox jumps over the lazy dog")
    r = client.completions.create(model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=0, temperature=0.0)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == decode(ids) and r.usage.completion_tokens == 0
    assert lp.tokens == [decode([t]) for t in ids] and lp.token_logprobs[0] is None
    ref = logsoftmax_by_recompute(demo_checkpoint(), ids)
    for p in range(1, len(ids)):
        assert lp.token_logprobs[p] == pytest.approx(float(ref[p - 1, ids[p]]), abs=1e-4)
        best = int(ref[p - 1].argmax())
        assert lp.top_logprobs[p][decode([best])] == pytest.approx(float(ref[p - 1, best]), abs=1e-4)


def test_lm_eval_harness_loglikelihood_task_runs(app, tmp_path, monkeypatch):
    """lm-eval-harness's `local-completions` over HTTP, tokenizing through the server's
    /tokenizer_info, /tokenize and /detokenize (its `remote` backend: no tokenizer files),
    on a two-question multiple-choice task from a local file. Its scores are meaningless on
    random weights; each choice's loglikelihood must be the model's."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    from support.engine_helpers import logsoftmax_by_recompute

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    docs = [{"question": "The sky is", "choices": [" blue", " made of green cheese"], "answer": 0},
            {"question": "Two plus two is", "choices": [" four", " five"], "answer": 0}]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny.yaml").write_text(
        "task: gptoss_tiny_loglikelihood\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\noutput_type: multiple_choice\n"
        "target_delimiter: ''\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n")
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={app[0]}/v1/completions,model={MODEL},tokenizer_backend=remote,max_retries=1",
        tasks=["gptoss_tiny_loglikelihood"], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
        log_samples=True)
    samples = results["samples"]["gptoss_tiny_loglikelihood"]
    assert len(samples) == len(docs) and 0.0 <= results["results"]["gptoss_tiny_loglikelihood"]["acc,none"] <= 1.0
    for sample in samples:
        for (context, continuation), ((loglikelihood, _),) in zip(sample["arguments"], sample["resps"]):
            ctx, whole = encode_text(context), encode_text(context + continuation)
            assert whole[: len(ctx)] == ctx
            ref = logsoftmax_by_recompute(demo_checkpoint(), whole)
            expected = sum(float(ref[p - 1, whole[p]]) for p in range(len(ctx), len(whole)))
            assert loglikelihood == pytest.approx(expected, abs=1e-3)


def test_logit_bias_steers_the_real_sampler_and_a_huge_top_k_is_a_400(client, app):
    """logit_bias works end to end (API -> SamplingParams -> the workers' sampler): +100 on
    one token makes greedy decoding emit only it. A 10^20 top_k, which once overflowed the
    sampler and killed the engine for everyone, is a 400, and the engine serves on."""
    token = 1428
    r = client.completions.create(model=MODEL, prompt=[200006, 1428, 200008], max_tokens=4, temperature=0.0,
                                  logit_bias={str(token): 100}, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4
    plain = client.completions.create(model=MODEL, prompt=[200006, 1428, 200008], max_tokens=4, temperature=0.0,
                                      extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, temperature=1.0,
                                       extra_body={"top_k": 10**20})
    assert "top_k" in str(e.value)
    # the biased run: every token is the forced one (its text repeated), the unbiased run is not
    from gptoss_ray.harmony.encoding import decode

    assert r.choices[0].text == decode([token]) * 4 != plain.choices[0].text
    assert client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2).choices[0].finish_reason
def test_chat_logprobs_for_every_content_token(client):
    # The random demo model writes no harmony header: its output is plain text, and every
    # token of it produced content (min_tokens keeps the stop tokens out), header-length
    # prefix included (it was 32 of 64 before the parser decided those tokens late).
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=64, temperature=0.0, logprobs=True,
                                       extra_body={"min_tokens": 64, "ignore_eos": True})
    choice = r.choices[0]
    assert r.usage.completion_tokens == 64 and not getattr(choice.message, "reasoning_content", None)
    assert choice.message.content and len(choice.logprobs.content) == 64


def test_completions_stop_string_cut_at_the_exact_character(client):
    kw = dict(model=MODEL, prompt=[200006, 1428, 200008], max_tokens=24, temperature=0.0, logprobs=0,
              extra_body={"ignore_eos": True, "skip_special_tokens": False})  # text = the tokens' texts joined
    base = client.completions.create(**kw).choices[0]
    tokens = base.logprobs.tokens  # each token's text: their lengths place the cut
    clean = next((i for i, t in enumerate(tokens) if "\ufffd" in t), len(tokens))  # before any split character
    ends = [len("".join(tokens[: k + 1])) for k in range(len(tokens))]
    k = next(i for i in range(4, clean) if ends[i] - ends[i - 1] >= 3)
    stop = base.text[ends[k - 1] + 1: ends[k - 1] + 3]  # starts inside token k: its first character stays
    cut = base.text.index(stop)
    for stream in (False, True):
        r = client.completions.create(stop=[stop], stream=stream, **kw)
        if stream:
            chunks = list(r)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
        else:
            text = r.choices[0].text
            assert r.choices[0].finish_reason == "stop"
            assert r.usage.completion_tokens == next(i for i, e in enumerate(ends) if e >= cut + len(stop)) + 1
        assert text == base.text[:cut]
