"""The on-disk phases of an online round (kto_jax/online/rounds.py): sampling and labelling.

    rows = sample(config, workdir, r, prompts, policy_config)   # round_{r}/samples.json
    counts = write_feedback(config, workdir, r, rows)           # round_{r}/feedback.json, labels.json

Each phase works in chunks of ``config.online.chunk_prompts`` prompts, writes each chunk's file
atomically (``sampling/part-{c}.jsonl``, ``labelling/part-{c}.jsonl``) and keeps the chunks on
disk when rerun, so a killed phase redoes at most one chunk. Chunk c of round r samples with
``chunk_seed(config.seed, r, c)``. With several processes every process computes every chunk
(generation and judges run on the whole mesh), process 0 alone writes, and the processes meet
before a phase reads what was written. Rows are HALOs main's: a sample is ``{prompt_id,
sample_id, prompt: [messages], output, generator, dataset, type: "sample"}`` (``train/sample.py``),
feedback rows are ``binary_feedback`` / ``pairwise_feedback`` (``train/label.py``).
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from kto_jax import faults, files
from kto_jax.errors import InputError
from kto_jax.generate import generate, prompt_inputs
from kto_jax.judges import make_judge
from kto_jax.log import note
from kto_jax.online.labels import binary_labels, preference_pairs, resolve_threshold
from kto_jax.stats import judged_rate
from kto_jax.train import setup
from kto_jax.train.plan import make_plan


def round_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, f"round_{r}")


def messages(turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def turns_of(row: dict) -> tuple:
    return tuple((m["role"], m["content"]) for m in row["prompt"])


def chunk_seed(seed: int, r: int, c: int) -> int:
    """The sampling seed of chunk c of round r (a pure function of the three)."""
    return int(np.random.SeedSequence([int(seed), r, c]).generate_state(1)[0])


# ---------------------------------------------------------------- phases


@dataclasses.dataclass
class Policy:
    """The weights a round samples from, with what sampling needs."""

    model: object
    params: object
    tokenizer: object
    template: object
    control_token: str | None


def load_policy(config) -> Policy:
    """The round's policy from its config's init source, on the run's mesh."""
    plan = make_plan(config, jax.device_count())
    mesh = setup.make_mesh(plan)
    model, params = setup.load_model(plan, mesh)
    tokenizer = setup.tokenizer_for(plan.data, model, config.model.name)
    model, params = setup.add_control_tokens(plan, model, params, tokenizer, mesh)
    return Policy(model, params, tokenizer, setup.chat_template(plan.data), (plan.loss.control_tokens or [None])[0])


def _sync(name: str) -> None:
    """All processes reach this point before any goes on (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _chunked(parts: list[str], start, name: str) -> list[dict]:
    """The rows of every chunk file of ``parts``, in order: a chunk on disk is read; for the others
    ``start(on_disk)`` (called once, only when some chunk is missing) returns ``compute(c) -> rows``,
    whose rows process 0 writes to ``parts[c]`` before the fault point ``name`` (the phase's)."""
    todo = [c for c, p in enumerate(parts) if not os.path.exists(p)]
    _sync(f"{name}.listed")  # every process sees the same chunks missing before any is written
    done: dict[int, list] = {}
    if todo:
        compute = start(len(parts) - len(todo))
        for c in todo:
            done[c] = compute(c)
            if jax.process_index() == 0:
                files.write_jsonl(parts[c], done[c])
            faults.point(name)
    _sync(f"{name}.written")
    return [row for c, p in enumerate(parts) for row in (done[c] if c in done else files.read_jsonl(p)[0])]


def sample(config, workdir: str, r: int, prompts: list, policy_config) -> list[dict]:
    """Round r's samples (``samples.json``), sampled chunk by chunk; chunks on disk are kept."""
    o, folder = config.online, round_dir(workdir, r)
    final = os.path.join(folder, "samples.json")
    if os.path.exists(final):
        with open(final, encoding="utf-8") as f:
            return json.load(f)
    n, chunks = int(o.samples_per_prompt), _chunks(len(prompts), int(o.chunk_prompts))
    generator = policy_config.init.source or policy_config.model.name

    def start(on_disk: int):
        note(
            f"round {r + 1}: sampling {len(prompts)} prompts x {n} from {generator} ({on_disk} of {len(chunks)} chunks on disk)"
        )
        policy = load_policy(policy_config)
        tok = policy.tokenizer

        def compute(c: int) -> list[dict]:
            chunk = [prompts[i] for i in chunks[c]]
            _, ids = prompt_inputs(chunk, policy.template, tok, config.data.max_prompt_length, policy.control_token)
            completions = generate(
                policy.model,
                policy.params,
                [i for i in ids for _ in range(n)],
                max_new_tokens=int(o.max_new_tokens),
                eos_id=tok.eos_id,
                pad_id=tok.pad_id,
                temperature=float(o.temperature),
                top_p=float(o.top_p),
                top_k=int(o.top_k),
                batch_size=int(o.batch_size),
                seed=chunk_seed(config.seed, r, c),
            )
            note(f"round {r + 1}: sampled chunk {c + 1}/{len(chunks)}")
            return [
                {
                    "prompt_id": r * len(prompts) + i,
                    "sample_id": k,
                    "prompt": messages(prompts[i]),
                    "output": tok.decode(completions[j * n + k]),
                    "generator": generator,
                    "dataset": f"{config.data.sources}:{o.prompt_split}",
                    "type": "sample",
                }
                for j, i in enumerate(chunks[c])
                for k in range(n)
            ]

        return compute

    parts = [os.path.join(folder, "sampling", f"part-{c:05d}.jsonl") for c in range(len(chunks))]
    rows = _chunked(parts, start, "online.sample")
    if jax.process_index() == 0:
        files.write_json(final, rows, indent=None)
    return rows


def judge_samples(judge, items) -> list[dict]:
    """Per (turns, completion): a unary judge's flag (``desirable``, reward 1.0 / 0.0), else the
    judge's score (``reward``; a reward model's)."""
    if getattr(judge, "unary", False):
        return [{"reward": 1.0 if ok else 0.0, "desirable": bool(ok)} for ok in judge.desirable(items)]
    return [{"reward": float(s)} for s in judge.scores(items)]


def label(config, workdir: str, r: int, rows: list[dict]) -> list[dict]:
    """Round r's judgments, one per sample in order (``judge_samples``), judged chunk by chunk;
    chunks on disk are kept."""
    o, folder = config.online, round_dir(workdir, r)
    chunks = _chunks(len(rows), int(o.chunk_prompts) * int(o.samples_per_prompt))

    def start(on_disk: int):
        note(f"round {r + 1}: judging {len(rows)} samples with {o.judge} ({on_disk} of {len(chunks)} chunks on disk)")
        judge = make_judge(config, o.judge, "config.online.judge")

        def compute(c: int) -> list[dict]:
            chunk = [rows[i] for i in chunks[c]]
            judged = judge_samples(judge, [(turns_of(row), row["output"]) for row in chunk])
            return [
                {"prompt_id": row["prompt_id"], "sample_id": row["sample_id"], **j} for row, j in zip(chunk, judged)
            ]

        return compute

    parts = [os.path.join(folder, "labelling", f"part-{c:05d}.jsonl") for c in range(len(chunks))]
    labelled = _chunked(parts, start, "online.label")
    if [(x["prompt_id"], x["sample_id"]) for x in labelled] != [(x["prompt_id"], x["sample_id"]) for x in rows]:
        raise InputError(
            f"{folder}/labelling does not match {folder}/samples.json (another round's files?): "
            f"remove {folder}/labelling to judge the samples again"
        )
    return labelled


def feedback(config, r: int, rows: list[dict], judged: list[dict]) -> tuple[list[dict], dict]:
    """HALOs' feedback rows from the samples and their judgments (:func:`label`), with their
    counts (``labels.json``): a unary judge's flag is the label, a score is thresholded."""
    o = config.online
    unary = all("desirable" in j for j in judged)
    counts: dict = {"samples": len(rows), "reward_mean": float(np.mean([j["reward"] for j in judged]))}
    if unary:
        counts["sampled"] = judged_rate(
            [j["desirable"] for j in judged]
        )  # the policy's own judged rate on these prompts
    # an empty (or all-whitespace) completion is judged, but is no text to train on (the files source rejects it)
    kept = [(row, j) for row, j in zip(rows, judged) if row["output"].strip()]
    counts["empty_dropped"] = len(rows) - len(kept)
    rows, judged = [row for row, _ in kept], [j for _, j in kept]
    rewards = [j["reward"] for j in judged]
    if not rows:
        raise InputError(
            f"round {r + 1}: all {counts['samples']} samples are empty: nothing to train on (is the EOS "
            "token the model's first choice? check config.online.max_new_tokens and the chat template)"
        )
    if o.feedback == "binary":
        threshold = 1.0 if unary else resolve_threshold(rewards, o.threshold)
        labels = binary_labels(rewards, threshold)
        out = [
            {
                "prompt_id": row["prompt_id"],
                "prompt": row["prompt"],
                "output": row["output"],
                "label": int(ok),
                "reward": rw,
                "type": "binary_feedback",
            }
            for row, rw, ok in zip(rows, rewards, labels)
        ]
        counts.update(threshold=threshold, desirable=int(sum(labels)), undesirable=len(labels) - int(sum(labels)))
        return out, counts
    groups: dict = {}
    for i, (row, rw) in enumerate(zip(rows, rewards)):
        groups.setdefault(row["prompt_id"], []).append((i, rw))
    pairs = preference_pairs(groups, o.pair_mode, float(o.pair_gap), seed=int(config.seed) + r)
    if not pairs:
        raise InputError(
            f"round {r + 1}: no two samples of one prompt differ in reward by more than config.online.pair_gap="
            f"{o.pair_gap} ({len(groups)} prompts): raise config.online.samples_per_prompt or temperature, "
            "or use feedback='binary'"
        )
    out = [
        {
            "prompt_id": rows[a]["prompt_id"],
            "prompt": rows[a]["prompt"],
            "output_A": rows[a]["output"],
            "output_B": rows[b]["output"],
            "label": 1,
            "reward_A": rewards[a],
            "reward_B": rewards[b],
            "reward_difference": abs(rewards[a] - rewards[b]),
            "type": "pairwise_feedback",
        }
        for a, b in pairs
    ]
    counts.update(pairs=len(pairs), prompts_paired=len({rows[a]["prompt_id"] for a, _ in pairs}), prompts=len(groups))
    return out, counts


def write_feedback(config, workdir: str, r: int, rows: list[dict]) -> dict:
    """Label round r's samples and write ``feedback.json`` and ``labels.json`` (kept when on disk)."""
    folder = round_dir(workdir, r)
    path, counts_path = os.path.join(folder, "feedback.json"), os.path.join(folder, "labels.json")
    if os.path.exists(path) and os.path.exists(counts_path):
        with open(counts_path, encoding="utf-8") as f:
            return json.load(f)
    out, counts = feedback(config, r, rows, label(config, workdir, r, rows))
    if counts["empty_dropped"]:
        note(
            f"round {r + 1}: {counts['empty_dropped']} of {counts['samples']} samples are empty, judged but left out of the feedback"
        )
    if jax.process_index() == 0:
        files.write_json(path, out, indent=None)
        files.write_json(counts_path, counts)
    _sync(f"online.feedback.{r}")
    return counts
