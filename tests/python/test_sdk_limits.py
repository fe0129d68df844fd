"""The official openai SDK against the gateway's rate limits.

Launched by tests/sdk_interop.rs with:
  NZ_GATEWAY_URL     the gateway
  NZ_RPM_KEY         a key limited to 1 request per minute
  NZ_CONCURRENT_KEY  a key limited to 1 concurrent request
  NZ_BUDGET_KEY      a key with a daily budget of 400 tokens
  NZ_MODEL           an allowed model
A missing variable is an error, never a skip.
"""

from __future__ import annotations

import os
import threading
import time

import httpx
import openai
import pytest
from openai import OpenAI

_missing = [n for n in ("NZ_GATEWAY_URL", "NZ_RPM_KEY", "NZ_CONCURRENT_KEY", "NZ_BUDGET_KEY", "NZ_MODEL") if not os.environ.get(n)]
if _missing:
    raise RuntimeError("test_sdk_limits.py needs: " + ", ".join(_missing))

GW = os.environ["NZ_GATEWAY_URL"].rstrip("/")
MODEL = os.environ["NZ_MODEL"]
MESSAGES = [{"role": "user", "content": "hi"}]


def client(key: str, retries: int) -> OpenAI:
    return OpenAI(base_url=GW + "/v1", api_key=key, max_retries=retries, timeout=30.0)


def test_rate_limit_error_with_retry_after():
    c = client(os.environ["NZ_RPM_KEY"], 0)
    c.chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=MODEL, messages=MESSAGES)
    e = err.value
    assert e.status_code == 429
    assert e.code == "rate_limit_exceeded"
    retry_after = int(e.response.headers["retry-after"])
    assert 1 <= retry_after <= 120
    assert e.response.headers.get("x-request-id")


def test_sdk_honours_retry_after_on_a_concurrency_refusal():
    key = os.environ["NZ_CONCURRENT_KEY"]
    # Hold the only slot with a slow stream (12 chunks, 150 ms apart).
    def slow():
        with httpx.Client(timeout=30.0) as h:
            h.post(
                GW + "/api/chat",
                headers={"Authorization": f"Bearer {key}", "x-sim-delay-ms": "150", "x-sim-chunks": "12"},
                json={"model": MODEL, "messages": MESSAGES},
            ).read()

    holder = threading.Thread(target=slow)
    holder.start()
    time.sleep(0.4)
    plain = client(key, 0)
    with pytest.raises(openai.RateLimitError) as err:
        plain.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert err.value.response.headers["retry-after"] == "1"
    # With retries the SDK waits the Retry-After and gets through once the slot is free.
    started = time.monotonic()
    patient = client(key, 5)
    reply = patient.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert reply.choices[0].message.content
    assert time.monotonic() - started >= 0.9
    holder.join()


def test_spent_budget_is_insufficient_quota_and_not_retried():
    c = client(os.environ["NZ_BUDGET_KEY"], 5)
    # Nothing caps this answer: the gateway caps it at what the budget has left.
    reply = c.chat.completions.create(model=MODEL, messages=MESSAGES, extra_headers={"x-sim-chunks": "300"})
    assert reply.choices[0].finish_reason == "length"
    assert 0 < reply.usage.completion_tokens < 300
    time.sleep(0.3)
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as err:
        c.chat.completions.create(model=MODEL, messages=MESSAGES)
    # `x-should-retry: false`: five retries allowed, none made.
    assert time.monotonic() - started < 0.5
    e = err.value
    assert e.code == "budget_exceeded"
    assert e.type == "insufficient_quota"
    assert e.response.headers["x-should-retry"] == "false"
    assert int(e.response.headers["retry-after"]) >= 1
