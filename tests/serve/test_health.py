"""/health on a live Serve app turns 503 while the engine has not finished a step it
started within the step timeout, and 200 again once the step ends (issue 13, defect 4).

The scripted engine's "stall" script holds its first step for STALL_S under the same
stall rule the real engine uses (engine_api.StepClock); step_timeout_s is far shorter."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from gptoss_ray.serve.testing import STALL_S, local_serve_app

pytestmark = pytest.mark.timeout(300)
MODEL = "m"
STEP_TIMEOUT_S = 0.5
assert STALL_S > 4 * STEP_TIMEOUT_S  # room to see the 503 while the step is stalled


@pytest.fixture(scope="module")
def url():
    args = {"engine_cls": "gptoss_ray.serve.testing:ScriptedEngine", "served_model_name": MODEL,
            "engine": {"step_timeout_s": STEP_TIMEOUT_S}}
    with local_serve_app(args, app_name="health") as base:
        yield base


def health(url: str) -> int:
    return httpx.get(url + "/health", timeout=30).status_code


def test_health_is_503_while_a_step_stalls_and_200_after(url):
    assert health(url) == 200
    done = threading.Event()

    def stalled_request():
        try:
            httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"model": MODEL, "messages": [{"role": "user", "content": "[[script:stall]]"}]})
        finally:
            done.set()

    threading.Thread(target=stalled_request, daemon=True).start()
    seen = []
    end = time.monotonic() + 60  # bounds a hang only
    while not done.is_set() and time.monotonic() < end:
        seen.append(health(url))
        if seen[-1] == 503:
            break
        time.sleep(0.1)
    assert 503 in seen, f"/health never turned 503 while the step stalled: {seen}"
    assert done.wait(120), "the stalled request never finished"
    end = time.monotonic() + 60  # Serve may have replaced the replica meanwhile: bounded wait
    while health(url) != 200:
        assert time.monotonic() < end, "/health did not return to 200 after the stall"
        time.sleep(0.5)
