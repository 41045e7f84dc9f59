"""lm-evaluation-harness against scripts/serve.py serving SmolLM2-135M-Instruct (a real server process on
127.0.0.1), with the offline tasks of tests/lm_eval_tasks/ (a YAML + JSONL each):

* kto_mc (multiple choice, log-likelihoods: lm-eval's ``local-completions``, prompts sent as token
  ids of SmolLM2's own tokenizer): the accuracy equals lm-eval's ``hf`` model's on the same folder;
* kto_gen (generate-until, greedy): the answers and exact match equal the ``hf`` model's;
* the served echo log-probs of a text equal transformers' log-softmax of it (within 1e-3).

One server for the module, started with it; the ``hf`` runs happen while it loads and compiles.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tests.test_serve import Background, ServerProcess
from tests.train_helpers import REPO

pytestmark = pytest.mark.slow

lm_eval = pytest.importorskip("lm_eval")
TASKS = os.path.join(REPO, "tests", "lm_eval_tasks")
TASK_NAMES = ["kto_mc", "kto_gen"]


def evaluate(model: str, model_args: str, tasks: list[str]) -> dict:
    """``lm_eval.simple_evaluate`` on ``tasks`` of tests/lm_eval_tasks/, run from the repository root
    (the tasks' data paths are relative to it), with the samples logged."""
    from lm_eval.tasks import TaskManager

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return lm_eval.simple_evaluate(
            model=model,
            model_args=model_args,
            tasks=tasks,
            task_manager=TaskManager(include_path=TASKS),
            log_samples=True,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """``(server, path, hf results)``: the SmolLM2 server, its folder, and lm-eval's hf model's results
    on both tasks (computed in a thread while the server starts)."""
    from tests.smollm2 import smollm2_dir

    path = smollm2_dir()
    server = ServerProcess(["--model", path, "--served_name=smol"], str(tmp_path_factory.mktemp("lm") / "server.log"))
    hf = Background(lambda: evaluate("hf", f"pretrained={path},dtype=float32,device=cpu,batch_size=8", TASK_NAMES))
    yield server, path, hf
    hf.join(600)
    server.stop()


def served(server, path: str) -> str:
    return (
        f"model=smol,base_url={server.url}/completions,tokenizer={path},tokenizer_backend=huggingface,"
        "tokenized_requests=True,batch_size=8,num_concurrent=1,max_retries=1,max_length=2048"
    )


def responses(results: dict, task: str) -> list:
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_lm_eval_multiple_choice_and_generation_equal_hf(smol):
    server, path, hf = smol
    ours = evaluate("local-completions", served(server, path), TASK_NAMES)
    theirs = hf.result()
    acc, hf_acc = ours["results"]["kto_mc"]["acc,none"], theirs["results"]["kto_mc"]["acc,none"]
    print(f"kto_mc acc: served {acc}, hf {hf_acc}")
    assert acc == hf_acc and 0.25 < acc <= 1.0, (acc, hf_acc)
    served_ll = np.asarray([[r[0] for r in rs] for rs in responses(ours, "kto_mc")], np.float64)
    hf_ll = np.asarray([[r[0] for r in rs] for rs in responses(theirs, "kto_mc")], np.float64)
    print(f"kto_mc log-likelihoods: max |served - hf| = {np.abs(served_ll - hf_ll).max():.2e}")
    np.testing.assert_allclose(served_ll, hf_ll, atol=1e-3)
    em, hf_em = ours["results"]["kto_gen"]["exact_match,strip"], theirs["results"]["kto_gen"]["exact_match,strip"]
    print(f"kto_gen exact_match: served {em}, hf {hf_em}; answers {responses(ours, 'kto_gen')}")
    assert responses(ours, "kto_gen") == responses(theirs, "kto_gen") and em == hf_em


def test_smollm2_echo_logprobs_equal_transformers(smol):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.test_serve import request

    server, path, _ = smol
    tok = AutoTokenizer.from_pretrained(path)
    text = "The Eiffel Tower is in Paris, the capital of France."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
    status, out = request(server.url, "/completions", {"prompt": [ids], "echo": True, "max_tokens": 0, "logprobs": 1})
    assert status == 200, out
    got = np.asarray(out["choices"][0]["logprobs"]["token_logprobs"][1:], np.float64)
    print(f"SmolLM2 echo log-probs: max |served - transformers| = {np.abs(got - expected).max():.2e}")
    np.testing.assert_allclose(got, expected, atol=1e-3)
