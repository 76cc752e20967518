"""The output path through a live Serve app, driven by the official openai client: stop
strings (cut at the exact character, in the content and never in the reasoning, the
sample aborted in the engine), chat logprobs for every content token, and the stop
bounds at the edge. The scripted engine replays known harmony token streams and, like
the real engine, knows nothing of stop strings."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from support.scripted import scripted_app, sdk_client

from gptoss_ray.harmony.encoding import get_encoding
from gptoss_ray.sampling_params import MAX_STOP_CHARS
from gptoss_ray.serve.testing import SCRIPTS

pytestmark = pytest.mark.timeout(300)
MODEL = "gpt-oss-scripted"


@pytest.fixture(scope="module")
def app():
    with scripted_app(MODEL, "output") as app:
        yield app


@pytest.fixture
def client(app):
    return sdk_client(app[0])


def ids(text: str) -> list[int]:
    return get_encoding().encode(text, allowed_special="all")


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def chat(client, script: str, stream: bool, **kw) -> dict:
    """The reply as one dict, whether it came whole or streamed."""
    r = client.chat.completions.create(model=MODEL, messages=user(f"x [[script:{script}]]"), stream=stream,
                                       **({"stream_options": {"include_usage": True}} if stream else {}), **kw)
    if not stream:
        c = r.choices[0]
        return {"content": c.message.content, "reasoning": getattr(c.message, "reasoning_content", None) or "",
                "finish": c.finish_reason, "tokens": r.usage.completion_tokens,
                "logprobs": [e.token for e in c.logprobs.content] if c.logprobs else None}
    chunks = list(r)
    deltas = [c.choices[0] for c in chunks if c.choices]
    entries = [e.token for d in deltas if d.logprobs and d.logprobs.content for e in d.logprobs.content]
    return {"content": "".join(d.delta.content or "" for d in deltas),
            "reasoning": "".join(getattr(d.delta, "reasoning_content", None) or "" for d in deltas),
            "finish": [d.finish_reason for d in deltas if d.finish_reason][-1], "tokens": chunks[-1].usage.completion_tokens,
            "logprobs": entries if kw.get("logprobs") else None}


def reply_tokens(script: str, upto: str) -> int:
    """Tokens of the script through the end of `upto` (what completion_tokens counts)."""
    full = SCRIPTS[script]
    return len(ids(full[: full.index(upto) + len(upto)]))


@pytest.mark.parametrize("stream", [False, True])
def test_stop_cuts_the_final_content_and_never_the_reasoning(client, stream):
    r = chat(client, "accent", stream, stop=["STOP"])
    assert r["reasoning"] == "Pense STOP à marquer."
    assert r["content"] == " marqué de " and r["finish"] == "stop"
    assert r["tokens"] == reply_tokens("accent", "marqué de STOP")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_inside_a_token_returns_the_text_before_it(client, stream):
    assert " marqué" in [get_encoding().decode([t]) for t in ids(SCRIPTS["accent"])]  # one token
    r = chat(client, "accent", stream, stop=["qué"])
    assert r["content"] == " mar" and r["finish"] == "stop"
    assert r["tokens"] == reply_tokens("accent", " marqué")


@pytest.mark.parametrize("stream", [False, True])
def test_several_stop_strings_spanning_tokens(client, stream):
    r = chat(client, "stop_string", stream, stop=["gamma", "beta ST", "alpha beta STOP gamma delta"])
    assert r["content"] == "alpha " and r["finish"] == "stop"


def test_a_stop_string_aborts_its_sample_in_the_engine(client, app):
    # The script goes on for 600 slow tokens after "STOP" (the scripted engine runs the
    # samples one after the other): only aborts end this request in seconds.
    r = client.chat.completions.create(model=MODEL, messages=user("x [[script:slow_stop]]"), stop=["STOP"], n=2,
                                       max_tokens=1000)
    assert [c.message.content for c in r.choices] == ["alpha ", "alpha "]
    assert [c.finish_reason for c in r.choices] == ["stop", "stop"]
    assert r.usage.completion_tokens == 2 * reply_tokens("slow_stop", "STOP")
    aborted = app[1].debug.remote("aborted").result()
    assert f"{r.id}#0" in aborted  # sample 0 was stopped in the engine, not run to its end
    assert r.id not in app[1].debug.remote("finished").result()
    stats = app[1].stats.remote().result()
    assert stats.num_running == 0 and stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_for_every_content_token(client, stream):
    # plain text without a harmony header: every token but the closing <|return|> is content
    r = chat(client, "plain", stream, logprobs=True)
    assert r["content"] == "Just plain text, no harmony at all."
    assert len(r["logprobs"]) == r["tokens"] - 1 == len(ids(SCRIPTS["plain"])) - 1
    assert "".join(r["logprobs"]) == r["content"]
    # with a stop string: the tokens that made visible content, the one cut short included
    r = chat(client, "stop_string", stream, logprobs=True, stop=["STOP"])
    assert r["content"] == "alpha beta " and r["logprobs"] == ["alpha", " beta", " STOP"]


@pytest.mark.parametrize("stream", [False, True])
def test_completions_stop_inside_a_token(client, stream):
    prompt = ids(" marqué de la fin")  # the scripted engine replays its default script for any prompt...
    kw = dict(model=MODEL, prompt=prompt, max_tokens=50, stop=["from the scr"], stream=stream)
    r = client.completions.create(**kw)
    if stream:
        text = "".join(c.choices[0].text for c in r if c.choices)
    else:
        text = r.choices[0].text
        assert r.choices[0].finish_reason == "stop"
        assert r.usage.completion_tokens == reply_tokens("default", "from the scripted")
    assert text.endswith("Hello ") and "scr" not in text


@pytest.mark.parametrize("stop, why", [
    (["x" * (MAX_STOP_CHARS + 1)], "characters"),
    (["s"] * 17, "at most"),
    (["ok", ""], "non-empty"),
])
def test_stop_strings_are_bounded_at_the_edge(app, stop, why):
    r = httpx.post(app[0] + "/v1/chat/completions", json={"model": MODEL, "messages": user("hi"), "stop": stop},
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "stop" and why in err["message"] and len(r.text) < 1000


def test_a_1mb_stop_string_does_not_hold_up_other_requests(client, app):
    body = {"model": MODEL, "messages": user("hi"), "max_tokens": 3, "stop": ["y" * 2**20]}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        big = pool.submit(httpx.post, app[0] + "/v1/chat/completions", json=body, timeout=60)
        normal = client.chat.completions.create(model=MODEL, messages=user("hi"))
        assert normal.choices[0].message.content == "Hello from the scripted engine!"
        assert big.result().status_code == 400 and big.result().json()["error"]["param"] == "stop"
