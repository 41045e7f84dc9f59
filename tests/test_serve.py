"""scripts/serve.py end to end: a real server process on 127.0.0.1 (port 0), real HTTP (urllib).

* tiny-1m (random init, byte tokenizer, plain template): OpenAI-shaped answers; greedy answers
  equal ``kto_jax.generate.generate`` run here on the same params and prompt tokens (with the
  server's shapes: batch 1, prompt and new tokens padded to powers of two); 8 concurrent requests
  answer as they do one at a time; a seeded sampled request repeats; bad input is a 400 naming the
  field, a wrong key a 401; every prompt is at most 32 tokens, so few shapes are compiled;
* ``finish_row`` (how a generated row is cut at max_tokens, stop tokens and stop strings);
* an orbax source (a checkpoint written here) gives the run's weights and template (in-process);
* SmolLM2-135M-Instruct: a chat request in its own template answers what transformers' greedy
  ``generate`` writes for that rendered prompt.

Each model's server is one module-scoped process; the SmolLM2 one starts with the module, so it
loads and compiles while the tiny tests run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest

from kto_jax.judges.api import ApiJudge, paper_messages, parse_choice
from kto_jax.judges.protocol import candidate_first, pairwise_winrate
from kto_jax.judges.store import JudgmentStore
from kto_jax.serve.batching import Choice
from tests.train_helpers import REPO, read, tail

SERVE = os.path.join(REPO, "scripts", "serve.py")
KEY = "sk-test"
START_TIMEOUT = 240


class ServerProcess:
    """``python scripts/serve.py ARGS --port 0``; ``url`` waits for its "serving ... on URL" line."""

    def __init__(self, args: list[str], log_path: str):
        env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"}
        self.log_path = log_path
        with open(log_path, "w", encoding="utf-8") as log:
            self.proc = subprocess.Popen(
                [sys.executable, SERVE, *args, "--port=0"],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("serving "):
                self._ready.set()
        self._ready.set()  # stdout closed: the process ended

    @property
    def url(self) -> str:
        if not self._ready.wait(START_TIMEOUT) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"server did not start: stdout {self.lines}\n{tail(read(self.log_path))}")
        return next(line for line in self.lines if line.startswith("serving ")).split(" on ")[1]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def request(url: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
    """``(status, json)`` of GET (no body) or POST (a dict, or raw bytes) ``url + path``."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url + path, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def post_ok(url, path, body) -> dict:
    status, out = request(url, path, body)
    assert status == 200, out
    return out


SMOL_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
SMOL_MAX_TOKENS = 12


def shown(item):
    """(turns, first, second) as the protocol shows a (turns, candidate, baseline) comparison."""
    turns, a, b = item
    return (turns, a, b) if candidate_first(turns, 0) else (turns, b, a)


JUDGED = [
    ((("user", "What is 2 + 3?"),), "2 + 3 = 5.", "It is 6."),
    ((("system", "Be brief."), ("user", "Name a primary colour.")), "Blue.", "I do not know what you mean, sorry."),
]


def transformers_greedy(path: str, messages, max_new_tokens: int) -> tuple[str, int]:
    """``(text, prompt tokens)``: transformers' greedy ``generate`` on its own rendering of ``messages``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(path)
    text = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = hf_tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        new = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False)
    return hf_tok.decode(new[0, ids.shape[1] :], skip_special_tokens=True), int(ids.shape[1])


class Background(threading.Thread):
    """``fn()`` in a thread; ``result()`` joins and returns (or raises) it."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.value, self.error = fn, None, None
        self.start()

    def run(self):
        try:
            self.value = self.fn()
        except BaseException as e:  # noqa: BLE001 -- re-raised in result()
            self.error = e

    def result(self, timeout: float = 600):
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.value


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """``(server, transformers' answer)`` for SmolLM2, both started when the module starts: the server
    loads and compiles, and transformers runs in a thread, while the tiny tests run."""
    from tests.smollm2 import smollm2_dir

    path = smollm2_dir()
    server = ServerProcess(
        ["--model", path, "--served_name=smol", f"--api_key={KEY}"], str(tmp_path_factory.mktemp("smol") / "server.log")
    )
    # one thread for transformers (its lazy imports are not thread-safe)
    expected = Background(
        lambda: (
            transformers_greedy(path, SMOL_MESSAGES, SMOL_MAX_TOKENS),
            [transformers_greedy(path, paper_messages(*shown(c)), 10)[0] for c in JUDGED],
        )
    )
    yield server, expected
    server.stop()


@pytest.fixture(scope="module", autouse=True)
def _start_smol_early(request):
    """Start the SmolLM2 work first when its test is selected."""
    if any("smollm2" in item.name for item in request.session.items):
        request.getfixturevalue("smol")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """``(url, model, params)``: the tiny-1m server and the same random weights here."""
    server = ServerProcess(
        ["--model=tiny-1m", "--chat_template=plain", "--max_batch=8", "--batch_wait_ms=100", f"--api_key={KEY}"],
        str(tmp_path_factory.mktemp("tiny") / "server.log"),
    )
    from kto_jax.models.hf import from_hf

    model, params = from_hf("tiny-1m", seed=0)  # the server's --seed default
    yield server.url, model, params
    server.stop()


def _pow2(n: int, floor: int = 16) -> int:
    return 1 << (max(n, floor) - 1).bit_length()


def direct_greedy(model, params, ids: list[int], max_tokens: int) -> list[int]:
    """kto_jax.generate.generate at temperature 0 with the server's shapes, cut at ``max_tokens``."""
    from kto_jax.data.tokenize import ByteTokenizer
    from kto_jax.generate import generate

    tok = ByteTokenizer()
    out = generate(
        model,
        params,
        [ids],
        max_new_tokens=_pow2(max_tokens),
        eos_id=tok.eos_id,
        pad_id=tok.pad_id,
        temperature=0.0,
        batch_size=1,
        bucket=_pow2(len(ids)),
    )[0]
    return out[:max_tokens]


def test_chat_greedy_equals_generate(tiny):
    from kto_jax.data.chat import get_chat_template
    from kto_jax.data.tokenize import ByteTokenizer

    url, model, params = tiny
    messages = [{"role": "system", "content": "Answer yes or no."}, {"role": "user", "content": "Is it good?"}]
    out = post_ok(
        url,
        "/chat/completions",
        {"model": "judge", "messages": messages, "temperature": 0, "max_tokens": 10, "seed": 0},
    )
    assert out["object"] == "chat.completion" and out["id"].startswith("chatcmpl-") and out["model"] == "tiny-1m"
    assert isinstance(out["created"], int) and len(out["choices"]) == 1
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    ids = ByteTokenizer().encode(
        get_chat_template("plain").prompt([("system", "Answer yes or no."), ("user", "Is it good?")])
    )
    expected = direct_greedy(model, params, ids, 10)
    assert choice["message"]["content"] == ByteTokenizer().decode(expected)
    assert choice["finish_reason"] == ("length" if len(expected) == 10 else "stop")
    assert out["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(expected),
        "total_tokens": len(ids) + len(expected),
    }


def test_completions_greedy_equals_generate_with_n_and_lists(tiny):
    from kto_jax.data.tokenize import ByteTokenizer

    url, model, params = tiny
    prompts = ["The quick brown fox jumps over", "Once upon a time, in a land far"]
    out = post_ok(url, "/completions", {"model": "m", "prompt": prompts, "temperature": 0, "max_tokens": 7, "n": 2})
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-")
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    tok = ByteTokenizer()
    expected = [direct_greedy(model, params, tok.encode(p), 7) for p in prompts]
    assert [c["text"] for c in out["choices"]] == [tok.decode(e) for e in expected for _ in range(2)]
    assert out["usage"]["prompt_tokens"] == sum(len(p) for p in prompts)
    assert out["usage"]["completion_tokens"] == 2 * sum(len(e) for e in expected)
    # token-id prompts are the same prompts
    again = post_ok(
        url, "/completions", {"prompt": [tok.encode(p) for p in prompts], "temperature": 0, "max_tokens": 7}
    )
    assert [c["text"] for c in again["choices"]] == [tok.decode(e) for e in expected]


def test_stop_strings_cut_the_text(tiny):
    url, _, _ = tiny
    body = {"prompt": "The quick brown fox jumps over", "temperature": 0, "max_tokens": 12}
    full = post_ok(url, "/completions", body)["choices"][0]
    text = full["text"]
    if len(text) < 4:
        pytest.skip(f"the random model wrote too little text to cut: {text!r}")
    stop = text[2:4]
    cut = post_ok(url, "/completions", {**body, "stop": [stop, "never-there"]})["choices"][0]
    assert cut["text"] == text[: text.index(stop)] and cut["finish_reason"] == "stop"


def test_concurrent_requests_answer_as_one_at_a_time(tiny):
    from kto_jax.data.tokenize import ByteTokenizer

    url, model, params = tiny
    bodies = [{"prompt": f"Request number {i}: tell me more", "temperature": 0, "max_tokens": 3 + i} for i in range(6)]
    bodies += [
        {"messages": [{"role": "user", "content": f"Chat {i}, hello there"}], "temperature": 0, "max_tokens": 9}
        for i in range(2)
    ]
    paths = ["/completions"] * 6 + ["/chat/completions"] * 2

    def answer(out):
        return [(c.get("text", c.get("message", {}).get("content")), c["finish_reason"]) for c in out["choices"]], out[
            "usage"
        ]

    alone = [answer(post_ok(url, p, b)) for p, b in zip(paths, bodies)]
    tok = ByteTokenizer()
    for body, (choices, _) in zip(bodies[:6], alone):
        assert choices[0][0] == tok.decode(direct_greedy(model, params, tok.encode(body["prompt"]), body["max_tokens"]))
    health_url = url.removesuffix("/v1")
    _, before = request(health_url, "/health", key=None)
    together: list = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i):
        barrier.wait()
        together[i] = answer(post_ok(url, paths[i], bodies[i]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert together == alone
    _, health = request(health_url, "/health", key=None)
    assert health["status"] == "ok" and health["jobs"] - before["jobs"] == len(bodies)
    assert health["largest_batch"] >= 2, health  # the batcher did batch
    assert health["batches"] - before["batches"] < len(bodies), (before, health)


def test_seeded_sampling_repeats(tiny):
    url, _, _ = tiny
    body = {"prompt": "Sample me something nice", "temperature": 1.0, "top_p": 0.9, "max_tokens": 8, "n": 2, "seed": 3}
    first, second = post_ok(url, "/completions", body), post_ok(url, "/completions", body)
    assert [c["text"] for c in first["choices"]] == [c["text"] for c in second["choices"]]


def test_finish_row_cuts_at_max_tokens_stop_ids_and_strings():
    from kto_jax.serve.batching import finish_row

    def decode(ids):
        return "".join(chr(ord("a") + i) for i in ids)

    assert finish_row([0, 1, 2], 16, 8, decode) == Choice("abc", [0, 1, 2], "stop")  # EOS after 3 tokens
    assert finish_row([0, 1, 2, 3], 4, 4, decode).finish_reason == "length"  # no EOS in max_tokens
    assert finish_row(list(range(16)), 16, 5, decode) == Choice("abcde", [0, 1, 2, 3, 4], "length")
    assert finish_row([0, 1, 2, 3], 16, 3, decode) == Choice("abc", [0, 1, 2], "length")  # EOS came after max_tokens
    assert finish_row([0, 1, 9, 3], 16, 8, decode, stop_token_ids=(9,)) == Choice("ab", [0, 1], "stop", end_token=9)
    assert finish_row([0, 1, 2, 3, 4], 16, 8, decode, stop=("cd", "zz")) == Choice("ab", [0, 1, 2, 3], "stop")
    assert finish_row(list(range(8)), 8, 8, decode, stop=("zz",)) == Choice("abcdefgh", list(range(8)), "length")


BAD = [  # (path, body, param named)
    ("/chat/completions", {"model": "m"}, "messages"),
    ("/chat/completions", {"messages": []}, "messages"),
    ("/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    (
        "/chat/completions",
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": 3}]},
        "messages[1].content",
    ),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, "max_tokens"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}]}, "messages"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
    ("/completions", {"prompt": "hi", "n": 0}, "n"),
    ("/completions", {"prompt": "hi", "stop": [""]}, "stop"),
    ("/completions", {"prompt": ""}, "prompt"),
    ("/completions", {"prompt": [[1, 999]]}, "prompt"),
    ("/completions", {"max_tokens": 3}, "prompt"),
    ("/completions", b"{not json", None),
    ("/completions", b"[1, 2]", None),
]


def test_bad_requests_are_400_naming_the_field(tiny):
    url, _, _ = tiny
    for path, body, param in BAD:
        status, out = request(url, path, body)
        assert status == 400, (path, body, out)
        assert out["error"]["type"] == "invalid_request_error" and out["error"]["param"] == param, (body, out)
        assert out["error"]["message"]
    status, out = request(url, "/chat/completions", {"messages": [{"role": "user", "content": "x" * 3000}]})
    assert out["error"]["code"] == "context_length_exceeded" and "2048" in out["error"]["message"]
    assert request(url, "/nowhere", {"prompt": "x"})[0] == 404


def test_api_key(tiny):
    url, _, _ = tiny
    body = {"prompt": "hello there", "max_tokens": 2, "temperature": 0}
    for key in ("wrong", None):
        status, out = request(url, "/completions", body, key=key)
        assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert request(url, "/models", key="wrong")[0] == 401
    status, models = request(url, "/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny-1m"]
    assert request(url.removesuffix("/v1"), "/health", key=None)[0] == 200


def test_orbax_source_serves_the_runs_weights(tiny, tmp_path):
    """A checkpoint in a run's layout (config.json + checkpoints/STEP with state.params.model) loads
    with the run's tokenizer and template, whichever step is asked for."""
    import jax

    from kto_jax import checkpoint
    from kto_jax.config import tiny_config
    from kto_jax.serve import load_served_model

    config = tiny_config("kto", model="tiny-1m")
    (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
    _, _, params = tiny
    ckpt = checkpoint.Checkpointer(str(tmp_path))
    for step, scale in ((2, 1.0), (4, 2.0)):
        state = {"params": {"model": jax.tree_util.tree_map(lambda x, s=scale: x * s, params)}}
        ckpt.save(
            step, state, {}, {"model": "tiny-1m", "param_shapes": checkpoint.param_shapes(state["params"])}, force=True
        )
    ckpt.close()
    served = load_served_model(f"orbax:{tmp_path}@2")
    assert served.name == f"{tmp_path.name}@2" and served.template.name == "plain"
    flat = jax.tree_util.tree_leaves(served.params)
    np.testing.assert_array_equal(np.asarray(flat[0]), np.asarray(jax.tree_util.tree_leaves(params)[0]))
    latest = load_served_model(f"orbax:{tmp_path}")
    np.testing.assert_array_equal(np.asarray(jax.tree_util.tree_leaves(latest.params)[0]), 2 * np.asarray(flat[0]))


def test_smollm2_chat_equals_transformers_greedy(smol):
    """The real-model check: the judge's request shape, answered as transformers' greedy generate."""
    server, background = smol
    (expected, prompt_tokens), _ = background.result()
    body = {"model": "smol", "messages": SMOL_MESSAGES, "temperature": 0, "max_tokens": SMOL_MAX_TOKENS, "seed": 0}
    out = post_ok(server.url, "/chat/completions", body)
    assert out["model"] == "smol"
    assert out["choices"][0]["message"]["content"] == expected, (expected, out)
    assert out["usage"]["prompt_tokens"] == prompt_tokens
    assert expected.strip(), expected


def test_the_api_judge_asks_smollm2_served_here_with_the_paper_prompt(smol, tmp_path):
    """The API judge over real HTTP against a real model: its replies are transformers' greedy answers
    to compare.py's prompt, read as compare.py reads them; a rerun asks nothing."""
    server, background = smol
    judge = ApiJudge(server.url, "smol", api_key=KEY, concurrency=2)
    _, replies = background.result()
    store = JudgmentStore(str(tmp_path / "judgments.jsonl"))
    result = pairwise_winrate(judge, [(t, a, b) for t, a, b in JUDGED], store, progress=False)
    verdicts = {(tuple(map(tuple, r["turns"])), r["first"], r["second"]): r for r in store.rows.values()}
    for item, reply in zip(JUDGED, replies):
        row = verdicts[shown(item)]  # in the order the protocol drew for the prompt
        assert row["raw"] == reply, (row["raw"], reply)
        assert row["winner"] == parse_choice(reply)
    assert result["n"] == 2 and result["wins"] + result["baseline_wins"] + result["unparseable"] + result["ties"] == 2
    assert (
        pairwise_winrate(judge, JUDGED, JudgmentStore(str(tmp_path / "judgments.jsonl")), progress=False)["cached"] == 2
    )
