"""Streaming, HTTP errors and a bounded load test of scripts/serve.py (tiny-1m, a real server process
on 127.0.0.1), talked to with the official ``openai`` client:

* ``stream=true`` answers (chat and completions, greedy and seeded sampling, ``n``, stop strings)
  join to the unstreamed answer, in several chunks, the usage last with ``include_usage``;
* a client that leaves mid-stream frees the batch: its job is cancelled and the next request is
  answered;
* PUT/DELETE/PATCH are a 405 and the stdlib's own errors (too many headers) a JSON 4xx;
* 64 concurrent streams all complete; the server's RSS does not grow over 500 more requests.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request

import pytest

from tests.test_serve import KEY, ServerProcess, request

pytestmark = pytest.mark.slow

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        ["--model=tiny-1m", "--chat_template=plain", "--max_batch=8", "--batch_wait_ms=20", f"--api_key={KEY}"],
        str(tmp_path_factory.mktemp("stream") / "server.log"),
    )
    proc.url  # noqa: B018 -- waits for the server
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=120)


def joined(stream, chat: bool) -> tuple[dict, dict, int, dict | None]:
    """``(text per choice, finish_reason per choice, content chunks, usage)`` of a streamed answer."""
    texts: dict = {}
    finish: dict = {}
    pieces, usage = 0, None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == [], chunk
            usage = chunk.usage.model_dump()
            continue
        for c in chunk.choices:
            piece = (c.delta.content if chat else c.text) or ""
            texts[c.index] = texts.get(c.index, "") + piece
            pieces += bool(piece)
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish, pieces, usage


CASES = [  # (chat, request fields)
    (False, {"prompt": "The quick brown fox jumps over", "temperature": 0, "max_tokens": 48}),
    (False, {"prompt": "Sample me a story", "temperature": 1.0, "top_p": 0.9, "max_tokens": 40, "n": 2, "seed": 5}),
    (True, {"messages": [{"role": "user", "content": "Tell me a long story"}], "temperature": 0, "max_tokens": 40}),
    (True, {"messages": [{"role": "user", "content": "Hello"}], "temperature": 0.8, "max_tokens": 33, "seed": 9}),
]


@pytest.mark.parametrize("chat, fields", CASES)
def test_streamed_answer_equals_unstreamed(client, chat, fields):
    api = client.chat.completions if chat else client.completions
    whole = api.create(model="m", **fields)
    stream = api.create(model="m", stream=True, stream_options={"include_usage": True}, **fields)
    texts, finish, pieces, usage = joined(stream, chat)
    expected = [c.message.content if chat else c.text for c in whole.choices]
    assert [texts[i] for i in range(len(expected))] == expected
    assert [finish[i] for i in range(len(expected))] == [c.finish_reason for c in whole.choices]
    assert usage == whole.usage.model_dump()
    if whole.usage.completion_tokens > 2 * 16 * len(expected):  # more than two chunks of tokens per choice
        assert pieces >= 2 * len(expected), (pieces, expected)


def test_streamed_stop_string_is_never_sent(client):
    body = {"prompt": "Once upon a time, in a land far away", "temperature": 1.0, "seed": 11, "max_tokens": 60}
    text = client.completions.create(model="m", **body).choices[0].text
    if len(text) < 24:
        pytest.skip(f"the random model wrote too little to cut: {text!r}")
    stop = text[20:23]  # after the first chunk of tokens: held back while it could begin
    texts, finish, _, usage = joined(client.completions.create(model="m", stream=True, stop=[stop], **body), False)
    assert texts[0] == text[: text.index(stop)] and finish[0] == "stop" and usage is None


def test_client_leaving_mid_stream_frees_the_batch(server, client):
    base = server.url.removesuffix("/v1")
    before = request(base, "/health", key=None)[1]
    body = {"prompt": "Keep writing forever and ever", "temperature": 0.7, "max_tokens": 1900}
    with client.completions.create(model="m", stream=True, **body) as stream:
        next(iter(stream))
    # the batch ends at its next chunk; a short request is then served
    quick = client.completions.create(model="m", prompt="hi", max_tokens=2, temperature=0)
    assert quick.choices[0].finish_reason in ("stop", "length")
    after = request(base, "/health", key=None)[1]
    assert after["cancelled"] - before["cancelled"] == 1, (before, after)


def test_other_methods_are_405_and_every_error_is_json(server):
    for method in ("PUT", "DELETE", "PATCH"):
        req = urllib.request.Request(server.url + "/completions", data=b"{}", method=method)
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(req, timeout=30)
        assert caught.value.code == 405 and "GET, POST" in caught.value.headers["Allow"]
        error = json.loads(caught.value.read())["error"]
        assert error["type"] == "invalid_request_error" and method in error["message"]
    host, port = server.url.split("//")[1].split("/")[0].split(":")
    too_many = b"".join(b"X-%d: 1\r\n" % i for i in range(120))  # the stdlib's 431, over 100 headers
    for raw_request, status in ((b"GET /v1/models HTTP/1.1\r\n" + too_many + b"\r\n", b"431"),):
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(raw_request)
            raw = sock.makefile("rb").read()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.split()[1] == status and b"application/json" in head, head
        assert json.loads(body)["error"]["type"] == "invalid_request_error"
    assert request(server.url, "/nowhere", {"prompt": "x"})[1]["error"]["type"] == "not_found_error"


def run_all(fns, threads: int) -> list:
    """``fn()`` of each of ``fns`` on ``threads`` threads; the results in order (errors re-raised)."""
    out: list = [None] * len(fns)
    todo = iter(range(len(fns)))
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                out[i] = fns[i]()
            except Exception as e:  # noqa: BLE001 -- re-raised below
                out[i] = e

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(300)
    for r in out:
        if isinstance(r, Exception):
            raise r
    return out


def test_load_64_concurrent_streams_and_flat_memory(server, client):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process(server.proc.pid)

    def stream(i):
        def go():
            body = {"prompt": f"Load request {i}", "max_tokens": 6, "temperature": 0.5}
            texts, finish, _, _ = joined(client.completions.create(model="m", stream=True, **body), False)
            return finish[0]

        return go

    assert all(f in ("stop", "length") for f in run_all([stream(i) for i in range(64)], threads=64))
    run_all([stream(i) for i in range(100)], threads=16)  # warm: every batch shape compiled
    rss = proc.memory_info().rss
    run_all([stream(i) for i in range(500)], threads=16)
    grown = proc.memory_info().rss - rss
    print(f"server RSS {rss / 2**20:.0f} MiB, grown by {grown / 2**20:.1f} MiB over 500 requests")
    assert grown < 16 * 2**20, f"the server's RSS grew by {grown / 2**20:.1f} MiB over 500 requests"
