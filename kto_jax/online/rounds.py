"""Online rounds, HALOs main's online loop as one resumable job: sample from the current policy,
judge every sample, write the round's feedback file, train on it from the current weights; R times.

    python -m kto_jax.online --config experiments/online.py:init=orbax:runs/sft --workdir runs/online

Round r (0-based) takes prompts r*P ... (r+1)*P - 1 of ``config.online.prompt_split`` (the
distinct prompts of ``config.data.sources`` in a seeded order, P = ``prompts_per_round``),
samples ``samples_per_prompt`` completions of each from the policy (round 0:
``config.init.source``; round r: round r-1's final weights), judges them with
``config.online.judge`` and trains ``config.train.steps`` steps of ``config.loss`` on that
feedback, its starting weights the reference (HALOs' ``model.load_from`` per round; the
optimizer starts afresh each round). Every round's run is evaluated by ``config.eval`` on
``config.data.eval_split`` of the task's own sources (``data.eval_sources``), so each round is
judged on the same held-out prompts as the starting weights and an offline run.

Labels (kto_jax/online/labels.py): a unary judge's flag is the label (reward 1 or 0); a
reward model's score is thresholded (``threshold``: a number, "mean" or "median") for
``feedback="binary"``, or paired per prompt (``pair_mode``, ``pair_gap``) for ``"pairwise"``.

WORKDIR holds:
    config.json                         the online config (a rerun with another config is an error)
    initial/                            the starting weights evaluated (eval.only): the "before" row
    round_{r}/sampling/part-{c}.jsonl   chunk c of the samples (``chunk_prompts`` prompts each)
    round_{r}/samples.json              HALOs' sample file: prompt_id, sample_id, prompt, output, type "sample"
    round_{r}/labelling/part-{c}.jsonl  chunk c's rewards
    round_{r}/feedback.json             HALOs' binary_feedback / pairwise_feedback rows (the files source reads them)
    round_{r}/labels.json               counts, the threshold, the samples' judged rate
    round_{r}/train/                    the round's training run (kto_jax.train.loop)
    rounds.json                         one row per finished round, rewritten after each
    eval.json                           at the end: the initial row, the rounds, the last round's results

Resuming: every file is written atomically and a phase whose file exists is skipped, so the
same command rerun after ``kill -9`` restarts at the chunk (sampling, labelling) or checkpoint
(training) where it stopped. Chunk c of round r samples with the seed (config.seed, r, c): the
samples do not depend on where a run was stopped.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from kto_jax import faults, files
from kto_jax.online.labels import PAIR_MODES, binary_labels, preference_pairs, resolve_threshold
from kto_jax.train.hooks import note
from kto_jax.train.rules import InputError, config_diff, disallowed_on_resume

FEEDBACK_TYPES = ("binary", "pairwise")
PAIRWISE_ONLY_JUDGES = ("api",)  # verdicts between two answers only: no per-sample label
CONFIG_FILE, ROUNDS_FILE, EVAL_FILE = "config.json", "rounds.json", "eval.json"


# ---------------------------------------------------------------- config


def check_config(config) -> None:
    """Every ``config.online`` field, before anything is loaded (each error names its field and the fix)."""
    from kto_jax.judges import JUDGES

    o = config.online
    for field in ("rounds", "prompts_per_round", "samples_per_prompt", "chunk_prompts", "batch_size", "max_new_tokens"):
        if int(o[field]) < 1:
            raise ValueError(f"config.online.{field}={o[field]}: must be >= 1")
    if o.feedback not in FEEDBACK_TYPES:
        raise ValueError(f"config.online.feedback={o.feedback!r}: use one of {FEEDBACK_TYPES}")
    if o.feedback == "pairwise" and int(o.samples_per_prompt) < 2:
        raise ValueError(f"config.online.samples_per_prompt={o.samples_per_prompt}: pairwise feedback pairs samples of "
                         "one prompt, so it needs >= 2")
    if o.pair_mode not in PAIR_MODES:
        raise ValueError(f"config.online.pair_mode={o.pair_mode!r}: use one of {PAIR_MODES}")
    try:
        resolve_threshold([0.0], o.threshold)
    except ValueError as e:
        raise ValueError(f"config.online.threshold: {e}") from None
    if o.judge not in JUDGES:
        raise ValueError(f"unknown judge {o.judge!r} (config.online.judge); known: {sorted(JUDGES)}")
    if o.judge in PAIRWISE_ONLY_JUDGES:
        raise ValueError(f"config.online.judge={o.judge!r} only compares two answers, so it cannot label one sample: "
                         "use a unary judge (an exact checker) or judge='reward_model'")
    if config.data.columns or config.data.file_schema != "auto":
        raise ValueError("config.data.columns / config.data.file_schema apply to every files: source, the rounds' "
                         "feedback files too: give your own files canonical columns and leave these at their defaults")


def base(config):
    """The config without its ``online`` section: what each round's run starts from."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        del c["online"]
    return c


def round_dir(workdir: str, r: int) -> str:
    return os.path.join(workdir, f"round_{r}")


def round_config(config, workdir: str, r: int):
    """Round r's training run: ``config`` less ``online``, trained on the round's feedback file
    from round r-1's final weights (round 0: ``config.init.source``), evaluated on the task."""
    c = base(config)
    if r > 0:
        c.init.source = f"orbax:{os.path.join(round_dir(workdir, r - 1), 'train')}"
    c.data.eval_sources = config.data.eval_sources or config.data.sources
    c.data.sources = f"files:{os.path.join(round_dir(workdir, r), 'feedback.json')}"
    return c


def initial_config(config):
    """The starting weights evaluated on the task (``eval.only``): the rounds' "before"."""
    c = base(config)
    c.eval.only = True
    return c


def check_workdir(config, workdir: str) -> None:
    """A workdir holding an online run of another config is an error; a new one gets ``config.json``."""
    path = os.path.join(workdir, CONFIG_FILE)
    now = json.loads(config.to_json_best_effort())
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        bad = disallowed_on_resume(config_diff(saved, now))
        if bad:
            listed = "; ".join(f"config.{field}: {old!r} (saved) -> {new!r} (now)" for field, old, new in bad)
            raise InputError(f"{workdir} holds an online run with another config ({listed}): use a new --workdir")
    elif jax.process_index() == 0:
        files.write_json(path, now)


# ---------------------------------------------------------------- prompts


def round_prompts(prompts, rounds: int, per_round: int, seed: int) -> list[list]:
    """The prompts of each round: the distinct prompts in SHA-1 order (independent of file order),
    permuted by ``seed``, cut into ``rounds`` disjoint slices of ``per_round``."""
    from kto_jax.evaluate import eval_prompts

    distinct = eval_prompts(prompts, len(prompts))
    need = rounds * per_round
    if len(distinct) < need:
        raise ValueError(f"config.online: {rounds} rounds x {per_round} prompts_per_round = {need} prompts, but the split "
                         f"has {len(distinct)} distinct prompts: lower config.online.rounds or prompts_per_round")
    order = np.random.default_rng(seed).permutation(len(distinct))
    return [[distinct[i] for i in order[r * per_round:(r + 1) * per_round]] for r in range(rounds)]


def load_prompts(config) -> list:
    """The prompts of ``config.online.prompt_split`` of ``config.data.sources``."""
    from kto_jax.data.builders import load_mixture
    from kto_jax.train.setup import files_options

    d = config.data
    examples, _ = load_mixture(d.sources, config.online.prompt_split, d.data_dir, d.manual_dir or None,
                               skip_bad_records=d.skip_bad_records, seed=config.seed, files=files_options(config))
    if not examples:
        raise ValueError(f"config.data.sources={d.sources!r} split {config.online.prompt_split!r} (config.online.prompt_split) "
                         "has no examples to take prompts from")
    return [ex.prompt for ex in examples]


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
    from kto_jax.train import setup
    from kto_jax.train.plan import make_plan

    plan = make_plan(config, jax.device_count())
    mesh = setup.make_mesh(plan)
    model, params = setup.load_model(plan, mesh)
    tokenizer = setup.tokenizer_for(config, model)
    model, params = setup.add_control_tokens(plan, model, params, tokenizer, mesh)
    return Policy(model, params, tokenizer, setup.chat_template(config), (plan.loss.control_tokens or [None])[0])


def _sync(name: str) -> None:
    """All processes reach this point before any goes on (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _chunks(n: int, size: int) -> list[range]:
    return [range(s, min(s + size, n)) for s in range(0, n, size)]


def _read_chunk(path: str) -> list[dict]:
    rows, _ = files.read_jsonl(path)
    return rows


def sample(config, workdir: str, r: int, prompts: list, policy_config) -> list[dict]:
    """Round r's samples (``samples.json``), sampled chunk by chunk; chunks on disk are kept."""
    from kto_jax.evaluate import generate, prompt_inputs

    o, folder = config.online, round_dir(workdir, r)
    final = os.path.join(folder, "samples.json")
    if os.path.exists(final):
        with open(final, encoding="utf-8") as f:
            return json.load(f)
    n, chunks = int(o.samples_per_prompt), _chunks(len(prompts), int(o.chunk_prompts))
    parts = [os.path.join(folder, "sampling", f"part-{c:05d}.jsonl") for c in range(len(chunks))]
    todo = [c for c, p in enumerate(parts) if not os.path.exists(p)]
    _sync(f"online.sample.{r}")
    done: dict[int, list] = {}
    if todo:
        note(f"round {r + 1}: sampling {len(prompts)} prompts x {n} from {policy_config.init.source or policy_config.model.name}"
             f" ({len(chunks) - len(todo)} of {len(chunks)} chunks on disk)")
        policy = load_policy(policy_config)
        tok = policy.tokenizer
        for c in todo:
            chunk = [prompts[i] for i in chunks[c]]
            _, ids = prompt_inputs(chunk, policy.template, tok, config.data.max_prompt_length, policy.control_token)
            completions = generate(
                policy.model, policy.params, [i for i in ids for _ in range(n)], max_new_tokens=int(o.max_new_tokens),
                eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=float(o.temperature), top_p=float(o.top_p), top_k=int(o.top_k),
                batch_size=int(o.batch_size), seed=chunk_seed(config.seed, r, c),
            )
            done[c] = [{"prompt_id": r * len(prompts) + i, "sample_id": k, "prompt": messages(prompts[i]),
                        "output": tok.decode(completions[j * n + k]), "generator": policy_config.init.source or policy_config.model.name,
                        "dataset": f"{config.data.sources}:{o.prompt_split}", "type": "sample"}
                       for j, i in enumerate(chunks[c]) for k in range(n)]
            if jax.process_index() == 0:
                files.write_jsonl(parts[c], done[c])
            note(f"round {r + 1}: sampled chunk {c + 1}/{len(chunks)}")
            faults.point("online.sample")
        del policy
    _sync(f"online.sampled.{r}")
    rows = [row for c, p in enumerate(parts) for row in (done[c] if c in done else _read_chunk(p))]
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
    from kto_jax.judges import make_judge

    o, folder = config.online, round_dir(workdir, r)
    per_chunk = int(o.chunk_prompts) * int(o.samples_per_prompt)
    chunks = _chunks(len(rows), per_chunk)
    parts = [os.path.join(folder, "labelling", f"part-{c:05d}.jsonl") for c in range(len(chunks))]
    todo = [c for c, p in enumerate(parts) if not os.path.exists(p)]
    _sync(f"online.label.{r}")
    done: dict[int, list] = {}
    if todo:
        note(f"round {r + 1}: judging {len(rows)} samples with {o.judge} ({len(chunks) - len(todo)} of {len(chunks)} chunks on disk)")
        judge = make_judge(config, o.judge, "config.online.judge")
        for c in todo:
            chunk = [rows[i] for i in chunks[c]]
            judged = judge_samples(judge, [(turns_of(row), row["output"]) for row in chunk])
            done[c] = [{"prompt_id": row["prompt_id"], "sample_id": row["sample_id"], **j} for row, j in zip(chunk, judged)]
            if jax.process_index() == 0:
                files.write_jsonl(parts[c], done[c])
            faults.point("online.label")
        del judge
    _sync(f"online.labelled.{r}")
    labelled = [row for c, p in enumerate(parts) for row in (done[c] if c in done else _read_chunk(p))]
    if [(x["prompt_id"], x["sample_id"]) for x in labelled] != [(x["prompt_id"], x["sample_id"]) for x in rows]:
        raise ValueError(f"{folder}/labelling does not match {folder}/samples.json (another round's files?): "
                         f"remove {folder}/labelling to judge the samples again")
    return labelled


def feedback(config, r: int, rows: list[dict], judged: list[dict]) -> tuple[list[dict], dict]:
    """HALOs' feedback rows from the samples and their judgments (:func:`label`), with their
    counts (``labels.json``): a unary judge's flag is the label, a score is thresholded."""
    from kto_jax.evaluate import judged_rate

    o = config.online
    unary = all("desirable" in j for j in judged)
    counts: dict = {"samples": len(rows), "reward_mean": float(np.mean([j["reward"] for j in judged]))}
    if unary:
        counts["sampled"] = judged_rate([j["desirable"] for j in judged])  # the policy's own judged rate on these prompts
    # an empty (or all-whitespace) completion is judged, but is no text to train on (the files source rejects it)
    kept = [(row, j) for row, j in zip(rows, judged) if row["output"].strip()]
    counts["empty_dropped"] = len(rows) - len(kept)
    rows, judged = [row for row, _ in kept], [j for _, j in kept]
    rewards = [j["reward"] for j in judged]
    if not rows:
        raise ValueError(f"round {r + 1}: all {counts['samples']} samples are empty: nothing to train on (is the EOS "
                         "token the model's first choice? check config.online.max_new_tokens and the chat template)")
    if o.feedback == "binary":
        threshold = 1.0 if unary else resolve_threshold(rewards, o.threshold)
        labels = binary_labels(rewards, threshold)
        out = [{"prompt_id": row["prompt_id"], "prompt": row["prompt"], "output": row["output"], "label": int(ok),
                "reward": rw, "type": "binary_feedback"} for row, rw, ok in zip(rows, rewards, labels)]
        counts.update(threshold=threshold, desirable=int(sum(labels)), undesirable=len(labels) - int(sum(labels)))
        return out, counts
    groups: dict = {}
    for i, (row, rw) in enumerate(zip(rows, rewards)):
        groups.setdefault(row["prompt_id"], []).append((i, rw))
    pairs = preference_pairs(groups, o.pair_mode, float(o.pair_gap), seed=int(config.seed) + r)
    if not pairs:
        raise ValueError(f"round {r + 1}: no two samples of one prompt differ in reward by more than config.online.pair_gap="
                         f"{o.pair_gap} ({len(groups)} prompts): raise config.online.samples_per_prompt or temperature, "
                         "or use feedback='binary'")
    out = [{"prompt_id": rows[a]["prompt_id"], "prompt": rows[a]["prompt"], "output_A": rows[a]["output"],
            "output_B": rows[b]["output"], "label": 1, "reward_A": rewards[a], "reward_B": rewards[b],
            "reward_difference": abs(rewards[a] - rewards[b]), "type": "pairwise_feedback"} for a, b in pairs]
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
        note(f"round {r + 1}: {counts['empty_dropped']} of {counts['samples']} samples are empty, judged but left out of the feedback")
    if jax.process_index() == 0:
        files.write_json(path, out, indent=None)
        files.write_json(counts_path, counts)
    _sync(f"online.feedback.{r}")
    return counts


# ---------------------------------------------------------------- the rounds


def run(config, workdir: str) -> dict:
    """All rounds of ``config`` in ``workdir`` (resuming where a run stopped); returns eval.json's contents."""
    from kto_jax.train import loop

    check_config(config)
    workdir = os.path.abspath(os.path.expanduser(workdir))
    o = config.online
    for r in range(int(o.rounds)):  # every round's training config is checked before anything runs
        from kto_jax.train.plan import make_plan

        make_plan(round_config(config, workdir, r), jax.device_count())
    check_workdir(config, workdir)
    done = os.path.join(workdir, EVAL_FILE)
    if os.path.exists(done):
        note(f"this online run already finished with this config; nothing to do (its results: {done})")
        with open(done, encoding="utf-8") as f:
            return json.load(f)
    initial = loop.run(initial_config(config), os.path.join(workdir, "initial"))
    prompts = round_prompts(load_prompts(config), int(o.rounds), int(o.prompts_per_round), config.seed)
    rows_out: list[dict] = []
    for r in range(int(o.rounds)):
        train_config = round_config(config, workdir, r)  # its init source is the policy the round samples from
        samples = sample(config, workdir, r, prompts[r], train_config)
        counts = write_feedback(config, workdir, r, samples)
        results = loop.run(train_config, os.path.join(round_dir(workdir, r), "train"))
        row = {"round": r + 1, "init": train_config.init.source, "labels": counts,
               **{k: results[k] for k in ("generation", "held_out", "winrate") if k in results}}
        rows_out.append(row)
        if "generation" in row:
            g = row["generation"]
            note(f"round {r + 1}/{o.rounds}: judged desirable {g['desirable_rate']:.3f} [{g['ci90'][0]:.3f}, {g['ci90'][1]:.3f}] "
                 f"on {g['n']} held-out prompts")
        if jax.process_index() == 0:
            files.write_json(os.path.join(workdir, ROUNDS_FILE), rows_out)
    summary = {"initial": {k: initial[k] for k in ("generation", "held_out") if k in initial}, "rounds": rows_out,
               **{k: rows_out[-1][k] for k in ("generation", "held_out") if k in rows_out[-1]}}
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, EVAL_FILE), summary)
    return summary
