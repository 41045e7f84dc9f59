"""Bring your own feedback through the CLI: a realistic binary-feedback JSONL trains KTO, and a
preference JSONL trains DPO, on SmolLM2-135M-Instruct in its own chat template, with nothing
but config flags; every bad file fails with a message naming the file and field, before
anything trains.

The two real-model runs start when the module starts (they share the CPUs with the bad-input
runs, which use the tiny model and the byte tokenizer). The KTO run's final checkpoint is then
exported with scripts/export_hf.py and reloaded in transformers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from kto_jax.data.example_feedback import write_jsonl
from tests.smollm2 import smollm2_dir
from tests.train_helpers import REPO, finish, metrics_rows, read, start, subprocess_env, tail

TIMEOUT = 900
SMOL_FLAGS = ("--config.train.log_every=1", "--config.train.eval_batches=1", "--config.eval.evaluators=held_out")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("byo")
    binary, prefs = str(root / "feedback.jsonl"), str(root / "prefs.jsonl")
    counts = write_jsonl(binary, "binary", 400, seed=0, malformed=3)
    write_jsonl(prefs, "preference", 200, seed=1)
    return {"root": root, "binary": binary, "prefs": prefs, "binary_counts": counts}


@pytest.fixture(scope="module")
def smol_runs(files):
    """KTO on the binary file and DPO on the preference file, two steps each, started now."""
    model = smollm2_dir()
    waiting = {}
    for loss, data, extra in (
        ("kto", files["binary"], ["--config.data.skip_bad_records=True"]),
        ("dpo", files["prefs"], []),
    ):
        workdir = str(files["root"] / f"smol-{loss}")
        args = [
            "-m",
            "kto_jax.train",
            "--config",
            f"experiments/smol.py:loss={loss},data={data},model={model},steps=2",
            "--workdir",
            workdir,
            f"--config.data.data_dir={files['root'] / 'tfds'}",
            *SMOL_FLAGS,
            *extra,
        ]
        waiting[loss] = (workdir, start(args, subprocess_env(), str(files["root"] / f"{loss}.log")))
    yield {loss: (lambda w=w, p=p: (w, *finish(p, TIMEOUT))) for loss, (w, p) in waiting.items()}
    for _, proc in waiting.values():
        if proc.poll() is None:
            proc.kill()


def test_binary_feedback_file_trains_kto_on_smollm2_in_its_own_template(smol_runs, files):
    workdir, code, log = smol_runs["kto"]()
    assert code == 0, tail(log)
    rows = [r for r in metrics_rows(workdir) if "loss" in r and "eval/loss" not in r]
    assert [r["step"] for r in rows] == [1, 2] and all(abs(r["loss"]) < 10 for r in rows)
    stats = json.loads(read(os.path.join(workdir, "data_stats.json")))
    source = stats["train"]["sources"][f"files:{files['binary']}"]["files"]
    assert (source["schema"], source["form"]) == ("unpaired_preference", "conversational")
    counts = source["counts"]["train"]
    assert counts["bad"] == files["binary_counts"]["malformed"] == 3
    assert counts["read"] == 403 and counts["kept"] + counts["filtered"].get("other_split", 0) == 400
    assert stats["eval"]["source_examples"] > 0  # the held-out 10% of the prompts
    assert "Traceback" not in log


def test_preference_file_trains_dpo_on_smollm2(smol_runs, files):
    workdir, code, log = smol_runs["dpo"]()
    assert code == 0, tail(log)
    rows = [r for r in metrics_rows(workdir) if "rewards/accuracies" in r and "eval/loss" not in r]
    assert len(rows) == 2
    stats = json.loads(read(os.path.join(workdir, "data_stats.json")))
    assert stats["train"]["sources"][f"files:{files['prefs']}"]["files"]["schema"] == "preference"


# float32 roundoff over 30 layers (tests/test_smollm2.py measures 1.4e-4 on the untrained model)
EXPORT_TOL = 2e-4


def test_kto_run_exports_to_transformers(smol_runs, files):
    """The KTO run's final checkpoint through scripts/export_hf.py, as a user runs it, reloaded in
    transformers: its logits are kto_jax's on the trained params (read back from the folder and from
    the orbax checkpoint), training moved them away from SmolLM2's, and the folder's tokenizer and
    chat template render the prompt ids that the original folder does."""
    import jax
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_jax import checkpoint
    from kto_jax.data.chat import JinjaChatTemplate, bos_id_for
    from kto_jax.data.tokenize import HFTokenizer, encode_prompt
    from kto_jax.models.hf import from_hf
    from tests.hf_checkpoints import forward, hf_logits, max_diff

    workdir, code, log = smol_runs["kto"]()
    assert code == 0, tail(log)
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]  # the final step is saved
    out = str(files["root"] / "smol-kto-hf")
    proc = subprocess.run(
        [sys.executable, "scripts/export_hf.py", "--workdir", workdir, "--out", out],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert proc.returncode == 0, tail(proc.stderr)
    assert f"exported step 2 of {workdir}" in proc.stdout

    original = smollm2_dir()
    turns = (("system", "You are a careful assistant."), ("user", "What is 12 + 30? Answer with a number."))

    def prompt_ids(folder):
        template, tok = JinjaChatTemplate.from_folder(folder), HFTokenizer(folder)
        tok.bos_id = bos_id_for(template, tok)
        return encode_prompt(tok, template.prompt(turns)), tok

    ids, tok = prompt_ids(original)
    assert prompt_ids(out)[0] == ids
    hf_tok = AutoTokenizer.from_pretrained(out)
    text = hf_tok.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=False, add_generation_prompt=True
    )
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
    hf_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert hf_model.generation_config.eos_token_id == tok.eos_id  # generate stops where kto_jax's does

    model, params = from_hf(out)
    base_model, base_params = from_hf(original)
    saved, step = checkpoint.load_params(workdir, base_params)
    assert step == 2
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)))
    # two AdamW steps at lr 5e-7 then 5e-6 move every tensor by about 5.5e-6
    moved = [
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(base_params))
    ]
    assert all(1e-6 < m < 1e-4 for m in moved), moved

    x = np.asarray([ids], np.int32)
    ours, ref = np.asarray(forward(model, params, x)), hf_logits(hf_model, x)
    assert max_diff(ours, ref) < EXPORT_TOL
    assert max_diff(ours, np.asarray(forward(model, saved, x))) == 0.0
    assert (
        max_diff(ours, np.asarray(forward(base_model, base_params, x))) > 1e-2
    )  # measured 0.33: far beyond EXPORT_TOL


def test_the_loader_tokenizes_as_transformers_apply_chat_template(files):
    """The run's own path (setup.tokenizer_for, tokenize_config, the loader) on the smol config: each
    sequence is transformers' tokenization of the whole rendered dialogue, up to its EOS."""
    from transformers import AutoTokenizer

    from kto_jax.data.feedback import Unary
    from kto_jax.data.loader import FeedbackLoader
    from kto_jax.models.presets import PRESETS, get_preset
    from kto_jax.sweeps import load_config
    from kto_jax.train import setup
    from kto_jax.train.subplans import data_plan

    model_dir = smollm2_dir()
    config = load_config(f"{REPO}/experiments/smol.py:model={model_dir}")
    model = type("M", (), {"config": get_preset("tiny-1m", vocab_size=49152)})()
    data = data_plan(config, PRESETS)
    tokenizer = setup.tokenizer_for(data, model, config.model.name)
    records = [json.loads(line) for line in read(files["binary"]).splitlines()[:40]]
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("label"), bool) and "completion" in r][:8]
    examples = [
        Unary(str(i), tuple((m["role"], m["content"]) for m in r["prompt"]), r["completion"][0]["content"], r["label"])
        for i, r in enumerate(records)
    ]
    loader = FeedbackLoader(
        examples,
        tokenizer,
        setup.tokenize_config(data),
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=1,
    )
    hf = AutoTokenizer.from_pretrained(model_dir)
    for ex, tokens in zip(loader.examples, loader.tokens):
        messages = [{"role": r, "content": c} for r, c in ex.prompt] + [{"role": "assistant", "content": ex.completion}]
        expected = hf.apply_chat_template(messages, tokenize=False)
        expected = hf(expected, add_special_tokens=False)["input_ids"]
        ours = [*tokens[0].prompt, *tokens[0].completion, tokenizer.eos_id]
        assert ours == expected[: expected.index(tokenizer.eos_id, len(tokens[0].prompt)) + 1]
        assert (
            any(r == "system" for r, _ in ex.prompt)
            or ours[:3] == hf("<|im_start|>system\n", add_special_tokens=False)["input_ids"]
        )


# ---------------------------------------------------------------------------- bad files


def _write(path, lines):
    with open(path, "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def _row(i=0, **fields):
    return json.dumps(
        {
            "prompt": [{"role": "user", "content": f"What is {i} + 2?"}],
            "completion": [{"role": "assistant", "content": "4"}],
            "label": True,
            **fields,
        }
    )


def _case_files(root):
    good = [_row(i, label=i % 2 == 0) for i in range(20)]
    no_label = [json.dumps({"prompt": "What is 2 + 2?", "completion": "4"})] * 4
    return {
        "missing_column": (
            _write(root / "missing.jsonl", no_label),
            [],
            [r"missing\.jsonl", r"label", r"config\.data\.columns"],
        ),
        "unknown_label": (
            _write(root / "label.jsonl", good[:5] + [_row(label="maybe")] + good[5:]),
            [],
            [r"label\.jsonl, line 6", r"unknown label value", r"maybe", r"skip_bad_records"],
        ),
        "mixed_schema": (
            _write(root / "mixed.jsonl", good[:3] + [json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})]),
            [],
            [r"mixed\.jsonl, line 4", r"preference", r"unpaired_preference"],
        ),
        "empty_file": (_write(root / "empty.jsonl", []), [], [r"empty\.jsonl", r"no records|empty"]),
        "no_such_file": (str(root / "nope-*.jsonl"), [], [r"nope-\*\.jsonl"]),
        "holdout_out_of_range": (
            _write(root / "ok.jsonl", good),
            ["--config.data.holdout_fraction=1.5"],
            [r"config\.data\.holdout_fraction=1\.5"],
        ),
        "bad_weight": (_write(root / "ok2.jsonl", good) + ":-1", [], [r"config\.data\.sources", r"positive number"]),
        "template_without_tokenizer_folder": (
            _write(root / "ok3.jsonl", good),
            ["--config.data.chat_template=tokenizer"],
            [r"config\.data\.chat_template", r"tokenizer"],
        ),
        "unknown_schema": (
            _write(root / "ok4.jsonl", good),
            ["--config.data.file_schema=nope"],
            [r"config\.data\.file_schema='nope'"],
        ),
    }


BAD = (
    "missing_column",
    "unknown_label",
    "mixed_schema",
    "empty_file",
    "no_such_file",
    "holdout_out_of_range",
    "bad_weight",
    "template_without_tokenizer_folder",
    "unknown_schema",
)


@pytest.mark.parametrize("case", BAD)
def test_bad_feedback_file_fails_naming_file_and_field_before_training(case, tmp_path):
    pattern, flags, expected = _case_files(tmp_path)[case]
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "kto_jax.train",
        "--config",
        "experiments/tiny.py:loss=kto,steps=1",
        "--workdir",
        str(workdir),
        f"--config.data.sources=files:{pattern}",
        "--config.data.holdout_fraction=0.2",
        "--config.eval.judge=",
        "--config.train.global_batch_size=4",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        *flags,
    ]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0, tail(proc.stderr)
    for pattern_text in expected:
        assert re.search(pattern_text, proc.stderr), f"{pattern_text!r} not in stderr:\n{tail(proc.stderr)}"
    assert not os.path.exists(workdir / "metrics.jsonl"), "nothing should have trained"


def test_judged_evaluator_gives_the_judge_the_whole_conversation(tmp_path, synthetic_data_dir):
    """The judged evaluator end to end on the tiny run: samples.jsonl and the judged rate (the
    synthetic judge reads the conversation's last user turn)."""
    workdir = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "kto_jax.train",
        "--config",
        "experiments/tiny.py:loss=kto,steps=1",
        "--workdir",
        str(workdir),
        f"--config.data.data_dir={synthetic_data_dir}",
        "--config.train.global_batch_size=8",
        "--config.data.train_split=validation",
        "--config.data.eval_split=validation",
        "--config.train.eval_batches=1",
        "--config.eval.num_prompts=16",
        "--config.eval.batch_size=16",
        "--config.eval.max_new_tokens=4",
    ]
    proc = subprocess.run(command, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, tail(proc.stderr)
    samples = [json.loads(line) for line in read(os.path.join(workdir, "samples.jsonl")).splitlines()]
    assert len(samples) == 16 and all(s["prompt"].startswith("Shout ") for s in samples)
    generation = json.loads(read(os.path.join(workdir, "eval.json")))["generation"]
    assert generation["n"] == 16 and generation["desirable_rate"] == sum(s["desirable"] for s in samples) / 16
