"""The OpenAI-compatible server: a real ``python -m ltengine.serve`` process on a free 127.0.0.1 port,
driven by the real ``openai`` client (and httpx for the raw wire format). One server for the module;
the last test sends it SIGTERM. Every wait is bounded by an explicit timeout."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx", reason="needs the [serve] extra: pip install -e '.[serve]'")
openai = pytest.importorskip("openai", reason="needs the [serve] extra: pip install -e '.[serve]'")
pytest.importorskip("fastapi", reason="needs the [serve] extra: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="needs the [serve] extra: pip install -e '.[serve]'")

ROOT = Path(__file__).resolve().parents[1]
MODEL = "SmolLM2-135M-Instruct"
KEY = "sk-ltengine-test"
# SmolLM2-135M in fp32 holds 45 KiB of KV per token at full attention (30 layers): 24 MiB holds eight
# short chats at once; a BIG request gets about 7 full layers planned (prompt + max_tokens alone in the
# budget) and holds over half the budget once prefilled, so while one runs the next ones wait: the
# backpressure test fills the waiting queue deterministically (and aborts them all)
BUDGET = 24 << 20
BIG = {"prompt": list(range(1000, 1480)), "max_tokens": 1000, "ignore_eos": True, "temperature": 0}
MAX_WAITING = 8
START_TIMEOUT_S = 300  # the first load of the default model can take ~40 s on a busy CI machine
T = 120  # seconds any single HTTP call may take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"

    def client(self, **kw) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, timeout=T, max_retries=0, **kw)

    def http(self, auth: bool = True) -> "httpx.Client":
        return httpx.Client(base_url=self.url, timeout=T, headers={"Authorization": f"Bearer {KEY}"} if auth else {})

    def metrics(self) -> dict[str, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=T).text
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def wait_idle(self, timeout: float = 60) -> dict[str, float]:
        """Until nothing runs, waits or holds KV (the pool back to idle)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["ltengine_requests_running"] == 0 and m["ltengine_requests_waiting"] == 0 \
                    and m["ltengine_kv_bytes_used"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout} s: { {k: v for k, v in m.items() if 'requests' in k or 'kv' in k} }")
            time.sleep(0.1)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    cmd = [sys.executable, "-m", "ltengine.serve", "--host", "127.0.0.1", "--port", str(port), "--api-key", KEY,
           "--kv-budget", str(BUDGET), "--max-waiting", str(MAX_WAITING), "--shutdown-timeout", "90",
           "--interleave-layers", "8", "--device", "cpu", "--log-level", "warning"]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env)
    srv = Server(proc, port, log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode} before it was healthy:\n{srv.tail()}")
            try:
                if httpx.get(f"{srv.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"server not healthy after {START_TIMEOUT_S} s:\n{srv.tail()}")
            time.sleep(0.25)
        yield srv
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def _good_request(srv: Server) -> None:
    """A request served right after a bad one: the server keeps serving."""
    out = srv.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=2, temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens == 2


# ---------------------------------------------------------------------------------------------- happy paths
def test_models_and_health(server):
    assert httpx.get(f"{server.url}/health", timeout=T).json() == {"status": "ok"}
    assert [m.id for m in server.client().models.list().data] == [MODEL]


def test_completion_streamed_equals_non_streamed(server):
    client = server.client()
    kw = dict(model=MODEL, prompt="Once upon a time, in a small village,", max_tokens=12, temperature=0)
    full = client.completions.create(**kw)
    assert full.object == "text_completion" and full.choices[0].finish_reason in ("stop", "length")
    assert full.usage.completion_tokens <= 12 and full.usage.prompt_tokens > 0
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    ext = full.model_extra["ltengine"]
    assert ext["num_layers"] == 30 and isinstance(ext["lazy_layers"], list) and 0 <= ext["kv_saved"] <= 1
    pieces, finish = [], None
    for ch in client.completions.create(**kw, stream=True):
        pieces.append(ch.choices[0].text)
        finish = ch.choices[0].finish_reason or finish
    assert "".join(pieces) == full.choices[0].text
    assert finish == full.choices[0].finish_reason


def test_chat_streamed_equals_non_streamed_with_usage(server):
    client = server.client()
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "You are terse."},
                                     {"role": "user", "content": "Name three colors."}], max_tokens=12, temperature=0)
    full = client.chat.completions.create(**kw)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    text = full.choices[0].message.content
    assert text
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0, "stream": True}
    with server.http() as h, h.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and "ltengine" in last


def test_lazy_override_and_stop(server):
    client = server.client()
    full = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=8, temperature=0,
                                     extra_body={"lazy": {"fraction": 0.0}})
    assert full.model_extra["ltengine"]["lazy_layers"] == []
    stopped = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=8, temperature=0,
                                        stop=[" 5"], extra_body={"lazy": {"fraction": 0.0}})
    fixed = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,", max_tokens=2, temperature=0,
                                      extra_body={"lazy": {"policy": [0, 1], "window": 64}})
    assert fixed.model_extra["ltengine"]["lazy_layers"] == [0, 1]
    if " 5" in full.choices[0].text:
        assert stopped.choices[0].finish_reason == "stop"
        assert stopped.choices[0].text == full.choices[0].text[:full.choices[0].text.index(" 5")]


def test_fields_clients_send_by_default_are_accepted(server):
    out = server.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], max_tokens=2,
        temperature=0, n=1, presence_penalty=0, frequency_penalty=0, user="u-1", top_p=1, seed=3, logit_bias={},
        extra_body={"some_future_field": True})
    assert out.usage.completion_tokens >= 1


def test_eight_concurrent_streams(server):
    async def one(client, n):
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Write a word that starts with {'ABCDEFGH'[n]}."}],
            max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True},
            extra_body={"ignore_eos": True})
        pieces, usage, t_first = [], None, None
        async for ch in stream:
            if ch.choices and ch.choices[0].delta.content:
                t_first = t_first or time.monotonic()
                pieces.append(ch.choices[0].delta.content)
            usage = ch.usage or usage
        return "".join(pieces), usage, t_first, time.monotonic()

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, timeout=T, max_retries=0)
        async with client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, n) for n in range(8))), T)

    results = asyncio.run(main())
    assert all(text and usage.completion_tokens == 12 for text, usage, _, _ in results)
    # they ran together: every stream had its first token before any stream was done
    assert max(r[2] for r in results) < min(r[3] for r in results)
    assert server.wait_idle()["ltengine_requests_running_peak"] >= 2


def test_client_disconnect_mid_stream_frees_the_pool(server):
    before = server.metrics().get('ltengine_requests_finished_total{finish_reason="abort"}', 0)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 400,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with server.http() as h, h.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few chunks, then hang up
    assert any('"content"' in line for line in got)
    m = server.wait_idle(timeout=30)
    assert m['ltengine_requests_finished_total{finish_reason="abort"}'] == before + 1
    _good_request(server)


def test_auth(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", timeout=T, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    r = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "x"}, timeout=T)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/health", timeout=T).status_code == 200  # probes need no key
    _good_request(server)


def test_backpressure_503_with_retry_after(server):
    async def main():
        async with httpx.AsyncClient(base_url=server.url, timeout=T, headers={"Authorization": f"Bearer {KEY}"}) as h:
            big = {"model": MODEL, **BIG}
            # one big request fills the budget; MAX_WAITING more wait behind it
            async with h.stream("POST", "/v1/completions", json={**big, "stream": True}) as first:
                assert first.status_code == 200
                lines = first.aiter_lines()  # keep it: a collected iterator closes the stream
                await lines.__anext__()
                waiters = [asyncio.ensure_future(h.post("/v1/completions", json=big)) for _ in range(MAX_WAITING)]
                deadline = time.monotonic() + 60
                while server.metrics()["ltengine_requests_waiting"] < MAX_WAITING:
                    assert time.monotonic() < deadline, server.metrics()
                    await asyncio.sleep(0.1)
                over = await h.post("/v1/completions", json=big)
                for w in waiters:  # hang up on them all: aborted, their KV (none yet) released
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            return over

    over = asyncio.run(asyncio.wait_for(main(), 2 * T))
    assert over.status_code == 503 and int(over.headers["retry-after"]) >= 1
    assert over.json()["error"]["code"] == "server_overloaded"
    m = server.wait_idle(timeout=30)
    assert m["ltengine_kv_budget_bytes"] == BUDGET and m["ltengine_peak_kv_bytes"] <= BUDGET
    _good_request(server)


def test_metrics(server):
    m = server.metrics()
    for name in ("ltengine_requests_running", "ltengine_requests_waiting", "ltengine_requests_swapped",
                 "ltengine_kv_bytes_used", "ltengine_kv_budget_bytes", "ltengine_preemptions_total",
                 "ltengine_prompt_tokens_total", "ltengine_generation_tokens_total",
                 "ltengine_time_to_first_token_seconds_count", "ltengine_inter_token_latency_seconds_count",
                 "ltengine_lazy_layers_count"):
        assert name in m, name
    assert m["ltengine_prompt_tokens_total"] > 0 and m["ltengine_generation_tokens_total"] > 0
    assert m["ltengine_time_to_first_token_seconds_count"] > 0 and m["ltengine_inter_token_latency_seconds_count"] > 0
    assert m["ltengine_kv_budget_bytes"] == BUDGET


# ---------------------------------------------------------------------------------------------- bad requests
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
MSG = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
BAD = {  # name: (path, body (dict, or raw bytes), status, param, a phrase of the message)
    "invalid_json": (C, b'{"model": ', 400, None, "not valid JSON"),
    "body_not_an_object": (C, b"[1, 2]", 400, None, ""),
    "missing_model": (C, {"prompt": "Hi"}, 400, "model", "required"),
    "unknown_model": (C, {**OK, "model": "gpt-9"}, 404, "model", "does not exist"),
    "missing_prompt": (C, {"model": MODEL}, 400, "prompt", "required"),
    "empty_prompt": (C, {**OK, "prompt": ""}, 400, "prompt", "empty"),
    "prompt_batch": (C, {**OK, "prompt": ["a", "b"]}, 400, "prompt", "batch of 2"),
    "token_ids_out_of_vocab": (C, {**OK, "prompt": [1, 2, 10**7]}, 400, "prompt", "out of range"),
    "n_2": (C, {**OK, "n": 2}, 400, "n", "n=2"),
    "logprobs": (C, {**OK, "logprobs": 1}, 400, "logprobs", "logprobs"),
    "chat_logprobs": (CHAT, {**MSG, "logprobs": True}, 400, "logprobs", "logprobs"),
    "presence_penalty": (C, {**OK, "presence_penalty": 0.5}, 400, "presence_penalty", "presence_penalty"),
    "frequency_penalty": (CHAT, {**MSG, "frequency_penalty": 1}, 400, "frequency_penalty", "frequency_penalty"),
    "echo": (C, {**OK, "echo": True}, 400, "echo", "echo"),
    "max_tokens_zero": (C, {**OK, "max_tokens": 0}, 400, "max_tokens", "max_tokens"),
    "max_tokens_not_a_number": (C, {**OK, "max_tokens": "many"}, 400, "max_tokens", "max_tokens"),
    "over_the_context": (C, {**OK, "max_tokens": 9000}, 400, "prompt", "8192"),
    "temperature_negative": (C, {**OK, "temperature": -1}, 400, "temperature", "temperature"),
    "top_p_zero": (C, {**OK, "top_p": 0}, 400, "top_p", "top_p"),
    "five_stop_strings": (C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    "stream_options_without_stream": (C, {**OK, "stream_options": {"include_usage": True}}, 400, "stream_options", ""),
    "lazy_fraction_out_of_range": (C, {**OK, "lazy": {"fraction": 2}}, 400, "lazy.fraction", "[0, 1]"),
    "lazy_unknown_policy": (C, {**OK, "lazy": {"policy": "magic"}}, 400, "lazy.policy", "policy"),
    "lazy_unknown_key": (C, {**OK, "lazy": {"sparsity": 0.5}}, 400, "lazy.sparsity", ""),
    "missing_messages": (CHAT, {"model": MODEL}, 400, "messages", "required"),
    "empty_messages": (CHAT, {**MSG, "messages": []}, 400, "messages", ""),
    "bad_role": (CHAT, {**MSG, "messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages.0.role", ""),
    "tools": (CHAT, {**MSG, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", "tool"),
    "json_response_format": (CHAT, {**MSG, "response_format": {"type": "json_object"}}, 400, "response_format", ""),
}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_request(server, kind):
    path, body, status, param, phrase = BAD[kind]
    with server.http() as h:
        r = h.post(path, content=body, headers={"content-type": "application/json"}) if isinstance(body, bytes) \
            else h.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param, err
    assert phrase.lower() in err["message"].lower(), err
    _good_request(server)


def test_bad_request_413_405_404(server):
    with server.http() as h:
        r = h.post(C, content=b'{"prompt": "' + b"x" * (5 << 20) + b'"}', headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        r = h.get(C)
        assert r.status_code == 405 and "error" in r.json()
        r = h.post("/v1/embeddings", json={"model": MODEL, "input": "x"})
        assert r.status_code == 404 and "error" in r.json()
    _good_request(server)


def test_openai_client_raises_bad_request_with_the_numbers(server):
    with pytest.raises(openai.BadRequestError, match=r"8192"):
        server.client().completions.create(model=MODEL, prompt="Hi", max_tokens=9000)
    _good_request(server)


# ---------------------------------------------------------------------------------------------- detokenizer
def test_incremental_text_joins_to_the_full_decode(default_model):
    from ltengine.data import chapter
    from ltengine.sequence import TextStream

    tok = default_model[1]
    text = chapter(1)[:3000] + " naïve café — 東京 🙂 done."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    full = tok.decode(ids, skip_special_tokens=True)
    for stop in ((), ("Bennet", "東京")):
        inc = TextStream(tok, stop=stop)
        pieces, i = [], 0
        while i < len(ids):
            n = 1 + i % 3  # one to three tokens a step
            pieces.append(inc.push(ids[i:i + n]))
            i += n
        assert all("\ufffd" not in p for p in pieces)
        streamed = "".join(pieces)
        assert full.startswith(streamed) and len(full) - len(streamed) <= max(map(len, stop), default=1) - 1
        assert streamed + inc.finish(full) == full


# ---------------------------------------------------------------------------------------------- last: SIGTERM
def test_sigterm_finishes_in_flight_then_exits(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "ignore_eos": True, "temperature": 0,
            "stream": True}
    with server.http() as h, h.stream("POST", C, json=body) as r:
        lines = r.iter_lines()
        first = next(lines)
        os.kill(server.proc.pid, signal.SIGTERM)
        rest = [line for line in [first, *lines] if line]
    assert rest[-1] == "data: [DONE]"
    n_text = sum(1 for line in rest if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"])
    final = [json.loads(line[6:]) for line in rest if line.startswith("data: {")][-1]
    assert final["choices"][0]["finish_reason"] == "length" and n_text >= 1
    assert server.proc.wait(timeout=120) == 0
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{server.url}/health", timeout=5)
