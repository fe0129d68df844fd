"""Interop tests: the OFFICIAL `openai` and `ollama` Python SDKs as clients of a running gateway.

Launched by a Rust integration test (with NZ_TEST_PYTHON -m pytest) that starts the
gateway in front of `ollama-sim` and sets:

  NZ_GATEWAY_URL   base URL of the gateway, e.g. http://127.0.0.1:PORT
  NZ_API_KEY       a valid key whose tenant may use only llama3.2:latest and qwen2.5:0.5b
  NZ_MODEL         an allowed model (llama3.2)
  NZ_DENIED_MODEL  a model present upstream but not allowed (mistral:7b)
  NZ_SIM_CHUNKS    number of content chunks the simulator streams ("tok1 ", "tok2 ", ...)
  NZ_SIM_URL       the simulator's own base URL (GET /__sim/requests lists what it received)

A missing variable is an error at collection time, never a skip.
"""

from __future__ import annotations

import os

import httpx
import ollama
import openai
import pytest
from openai import OpenAI

_REQUIRED = (
    "NZ_GATEWAY_URL",
    "NZ_API_KEY",
    "NZ_MODEL",
    "NZ_DENIED_MODEL",
    "NZ_SIM_CHUNKS",
    "NZ_SIM_URL",
)
_missing = [name for name in _REQUIRED if not os.environ.get(name)]
if _missing:
    raise RuntimeError(
        "test_sdk_interop.py needs these environment variables (set by the Rust test "
        "that launches it): " + ", ".join(_missing)
    )

GW = os.environ["NZ_GATEWAY_URL"].rstrip("/")
KEY = os.environ["NZ_API_KEY"]
MODEL = os.environ["NZ_MODEL"]
DENIED = os.environ["NZ_DENIED_MODEL"]
N = int(os.environ["NZ_SIM_CHUNKS"])
SIM = os.environ["NZ_SIM_URL"].rstrip("/")

# The tenant's allow-list as set up by the launching test (canonical Ollama names).
ALLOWED = {"llama3.2:latest", "qwen2.5:0.5b"}
# What the simulator generates: N chunks "tok1 ", "tok2 ", ...
EXPECTED_TEXT = "".join(f"tok{i} " for i in range(1, N + 1))
# A key of the same shape that the gateway cannot know.
WRONG_KEY = KEY[:-1] + ("A" if KEY[-1] != "A" else "B")

TIMEOUT = 30.0
MESSAGES = [{"role": "user", "content": "Say something deterministic."}]


def _oa(key: str = KEY) -> OpenAI:
    return OpenAI(base_url=GW + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


def _ol(key: str = KEY) -> ollama.Client:
    return ollama.Client(host=GW, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT)


@pytest.fixture
def oa():
    client = _oa()
    yield client
    client.close()


@pytest.fixture
def ol():
    client = _ol()
    yield client
    client.close()


def sim_requests() -> list[dict]:
    """Every request the upstream (simulator) has received so far."""
    r = httpx.get(SIM + "/__sim/requests", timeout=TIMEOUT)
    r.raise_for_status()
    records = r.json()
    assert isinstance(records, list), records
    return records


def _path(record: dict) -> str:
    return str(record.get("path", ""))


# ---------------------------------------------------------------------------------------
# openai SDK
# ---------------------------------------------------------------------------------------


def test_openai_chat_non_stream(oa):
    resp = oa.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert len(resp.choices) == 1
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content == EXPECTED_TEXT
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == N
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_openai_chat_stream(oa):
    parts: list[str] = []
    finish_reasons: list[str] = []
    chunks = 0
    with oa.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True) as stream:
        for chunk in stream:  # the SDK consumes the closing `data: [DONE]`
            chunks += 1
            assert chunk.usage is None, "usage chunk sent although include_usage was not requested"
            for choice in chunk.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish_reasons.append(choice.finish_reason)
    assert chunks >= N
    assert "".join(parts) == EXPECTED_TEXT
    assert finish_reasons == ["stop"]


def test_openai_chat_stream_include_usage(oa):
    parts: list[str] = []
    chunks = []
    with oa.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    ) as stream:
        for chunk in stream:
            chunks.append(chunk)
            for choice in chunk.choices:
                if choice.delta.content:
                    parts.append(choice.delta.content)
    assert "".join(parts) == EXPECTED_TEXT
    last = chunks[-1]
    assert last.usage is not None, "last chunk carries no usage"
    assert last.usage.completion_tokens == N
    assert all(c.usage is None for c in chunks[:-1]), "usage before the last chunk"


def test_openai_models_list_only_allowed(oa):
    ids = {m.id for m in oa.models.list()}
    assert ids == ALLOWED


def test_openai_models_retrieve(oa):
    allowed = sorted(ALLOWED)[0]
    model = oa.models.retrieve(allowed)
    assert model.id.split(":")[0] == allowed.split(":")[0]
    with pytest.raises(openai.NotFoundError):
        oa.models.retrieve(DENIED)


def test_openai_denied_model(oa):
    with pytest.raises(openai.PermissionDeniedError) as exc:
        oa.chat.completions.create(model=DENIED, messages=MESSAGES)
    assert exc.value.status_code == 403


def test_openai_denied_model_stream(oa):
    with pytest.raises(openai.PermissionDeniedError):
        with oa.chat.completions.create(model=DENIED, messages=MESSAGES, stream=True) as stream:
            for _ in stream:
                pass


def test_openai_wrong_key():
    client = _oa(WRONG_KEY)
    try:
        with pytest.raises(openai.AuthenticationError) as exc:
            client.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert exc.value.status_code == 401
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    finally:
        client.close()


def test_openai_embeddings(oa):
    # Default call (the SDK asks for base64 and decodes it, or accepts floats).
    resp = oa.embeddings.create(model=MODEL, input="hello world")
    assert len(resp.data) == 1
    vec = resp.data[0].embedding
    assert len(vec) > 0 and all(isinstance(x, float) for x in vec)
    # Explicit floats, batch input.
    resp = oa.embeddings.create(model=MODEL, input=["a", "b"], encoding_format="float")
    assert [d.index for d in resp.data] == [0, 1]
    assert all(len(d.embedding) > 0 for d in resp.data)


# ---------------------------------------------------------------------------------------
# ollama SDK
# ---------------------------------------------------------------------------------------


def test_ollama_chat_non_stream(ol):
    resp = ol.chat(model=MODEL, messages=MESSAGES)
    assert resp.message.role == "assistant"
    assert resp.message.content == EXPECTED_TEXT
    assert resp.done is True
    assert resp.eval_count == N


def test_ollama_chat_stream(ol):
    parts: list[str] = []
    chunks = list(ol.chat(model=MODEL, messages=MESSAGES, stream=True))
    for chunk in chunks:
        if chunk.message and chunk.message.content:
            parts.append(chunk.message.content)
    assert "".join(parts) == EXPECTED_TEXT
    final = chunks[-1]
    assert final.done is True
    assert final.eval_count == N
    assert all(not c.done for c in chunks[:-1])


def test_ollama_generate_stream(ol):
    chunks = list(ol.generate(model=MODEL, prompt="Say something deterministic.", stream=True))
    assert "".join(c.response or "" for c in chunks) == EXPECTED_TEXT
    final = chunks[-1]
    assert final.done is True
    assert final.eval_count == N


def test_ollama_list_only_allowed(ol):
    names = {m.model for m in ol.list().models}
    assert names == ALLOWED


def test_ollama_embed(ol):
    resp = ol.embed(model=MODEL, input=["hello", "world"])
    assert len(resp.embeddings) == 2
    assert all(len(v) > 0 for v in resp.embeddings)


def test_ollama_denied_model(ol):
    with pytest.raises(ollama.ResponseError) as exc:
        ol.chat(model=DENIED, messages=MESSAGES)
    assert exc.value.status_code == 403


def test_ollama_denied_model_stream(ol):
    with pytest.raises(ollama.ResponseError) as exc:
        list(ol.chat(model=DENIED, messages=MESSAGES, stream=True))
    assert exc.value.status_code == 403


def test_ollama_wrong_key():
    client = _ol(WRONG_KEY)
    try:
        with pytest.raises(ollama.ResponseError) as exc:
            client.chat(model=MODEL, messages=MESSAGES)
        assert exc.value.status_code == 401
        with pytest.raises(ollama.ResponseError) as exc:
            client.list()
        assert exc.value.status_code == 401
    finally:
        client.close()


def test_ollama_pull_is_blocked(ol):
    with pytest.raises(ollama.ResponseError) as exc:
        ol.pull(MODEL)
    assert exc.value.status_code == 403
    with pytest.raises(ollama.ResponseError) as exc:
        list(ol.pull(MODEL, stream=True))
    assert exc.value.status_code == 403
    pulls = [r for r in sim_requests() if _path(r).rstrip("/").lower().endswith("/api/pull")]
    assert pulls == [], f"upstream received {len(pulls)} pull request(s)"


# ---------------------------------------------------------------------------------------
# upstream view
# ---------------------------------------------------------------------------------------


def test_client_key_never_reaches_upstream(oa, ol):
    # Make sure both APIs have forwarded at least one request in this test.
    oa.chat.completions.create(model=MODEL, messages=MESSAGES)
    ol.chat(model=MODEL, messages=MESSAGES)
    records = sim_requests()
    assert any(_path(r).startswith("/v1/") for r in records)
    assert any(_path(r).startswith("/api/") for r in records)
    needles = {KEY}
    if len(KEY) > 24:
        needles.add(KEY[-16:])  # the secret tail alone must not leak either
    for r in records:
        headers = r.get("headers") or []
        for name, value in headers:
            for needle in needles:
                assert needle not in str(value), f"client key forwarded upstream in header {name!r}"
                assert needle not in str(name), "client key forwarded upstream in a header name"
        assert all(needle not in str(r.get("query") or "") for needle in needles), (
            "client key forwarded upstream in the query string"
        )
