"""The training loop: the only caller of ``train_step``; files, clocks and progress live here.

Writes to the workdir: ``config.json``, ``data_stats.json``, ``metrics.jsonl`` (one JSON
object per logged step), TensorBoard event files under ``tb/``, ``eval.json``,
``samples.jsonl`` and orbax checkpoints (``checkpoints/<step>``; the last is the final weights).
Rerunning the same command on the same workdir resumes from the latest complete checkpoint;
SIGTERM/SIGINT finish the current step, save and exit 0.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from tqdm import tqdm

from kto_jax import checkpoint, sharding
from kto_jax.checkpoint import Checkpointer
from kto_jax.evaluate import eval_prompts, generate, get_judge, judged_rate, winrate
from kto_jax.flops import device_peak_flops, step_flops
from kto_jax.train import setup
from kto_jax.models import abstract_params
from kto_jax.train.state import TrainState, learning_rate, make_optimizer, opt_state_shardings
from kto_jax.train.step import StepSpec, ValueHead, eval_step, reference_logps, train_step

LOGGED = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "grad_norm", "lr")


class MetricsWriter:
    """metrics.jsonl plus TensorBoard events (tensorboardX, no TensorFlow); process 0 only."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        if self.enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
            self.tb = SummaryWriter(os.path.join(workdir, "tb"))

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _py(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        for key, value in row.items():
            if key != "step" and isinstance(value, (int, float)):
                self.tb.add_scalar(key, value, step)
        self.tb.flush()

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


def _py(value):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()


def _fingerprint(config, steps: int) -> str:
    keys = {"model": config.model.to_dict(), "init": config.init.to_dict(), "data": config.data.to_dict(),
            "loss": config.loss.name, "seed": config.seed, "steps": steps,
            "batch": config.train.global_batch_size, "microbatches": config.train.num_microbatches}
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def _local_rows(array: np.ndarray) -> np.ndarray:
    per = array.shape[0] // jax.process_count()
    return array[jax.process_index() * per : (jax.process_index() + 1) * per]


def _cache_reference(step_spec, reference_params, batches, mesh) -> list[dict]:
    """Reference log-probs of each batch, as host arrays of the global batch."""
    fn = jax.jit(functools.partial(reference_logps, step_spec))
    out = []
    for batch in batches:
        logps = fn(reference_params, setup.to_global(batch, mesh))
        out.append({k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in logps.items()})
    return out


class Preemption:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves, and exits 0."""

    def __init__(self):
        self.signal = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _truncate_metrics(workdir: str, step: int) -> None:
    """Drop metrics.jsonl rows past ``step`` (written by a run that died after its last checkpoint)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if jax.process_index() != 0 or not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(rows)


def _cached_reference(config, step_spec, reference_params, make_batches, eval_batches, mesh, workdir, steps):
    """Reference log-probs of every training step and eval batch, computed once and stored in
    ``WORKDIR/reference_cache.npz`` (reused on resume when the fingerprint matches)."""
    key = _fingerprint(config, steps)
    path = os.path.join(workdir, "reference_cache.npz")
    if os.path.exists(path):
        with np.load(path, allow_pickle=False) as f:
            if str(f["fingerprint"]) == key:
                names = sorted({k.split("/", 2)[2] for k in f.files if k != "fingerprint"})
                def read(prefix, n):
                    return [{k: f[f"{prefix}/{i}/{k}"] for k in names} for i in range(n)]
                return read("train", steps), read("eval", len(eval_batches))
    start = time.perf_counter()
    train = _cache_reference(step_spec, reference_params, make_batches(), mesh)
    evals = _cache_reference(step_spec, reference_params, eval_batches, mesh)
    if jax.process_index() == 0:
        arrays = {f"{p}/{i}/{k}": v for p, rows in (("train", train), ("eval", evals)) for i, row in enumerate(rows) for k, v in row.items()}
        np.savez(path, fingerprint=np.asarray(key), **arrays)
    logging.info("cached reference log-probs for %d steps in %.1fs (fingerprint %s)", steps, time.perf_counter() - start, key)
    return train, evals


def run(config, workdir: str) -> dict:
    """Train ``config`` in ``workdir`` (resuming from its latest checkpoint); returns the eval results."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    setup.validate(config, jax.device_count())  # bad config fails here, before any loading or compiling
    spec, hparams = setup.loss_and_hparams(config)
    mesh = setup.make_mesh(config)
    model, model_params = setup.load_model(config, mesh)
    tokenizer = setup.tokenizer_for(config, model)
    train_data = setup.load_split(config, spec, config.data.train_split)
    loader = setup.make_loader(config, spec, train_data, tokenizer, seed=config.seed)
    eval_data = setup.load_split(config, spec, config.data.eval_split)
    steps = int(config.train.steps) or loader.steps_per_epoch

    mode = config.reference.mode if spec.needs_reference else "none"
    step_spec = StepSpec(model, spec, tuple(sorted(hparams.items())), int(config.train.num_microbatches), mode,
                         int(config.train.chunk_size), bool(config.train.skip_nonfinite))
    reference_params = jax.tree_util.tree_map(lambda x: x.copy(), model_params) if mode != "none" else None
    reference_meta = {"source": config.init.source or config.model.name,
                      "fingerprint": checkpoint.fingerprint(model_params) if mode != "none" else None}
    params = {"model": model_params}
    if spec.token_level:
        head = ValueHead().init(jax.random.PRNGKey(config.seed), jnp.zeros((1, 1, model.config.hidden_size)))["params"]
        params["value_head"] = jax.device_put(head, sharding.replicated(mesh))
    optimizer = make_optimizer(config.train.optimizer)
    lr_fn = functools.partial(learning_rate, config.train.optimizer)
    repl = sharding.replicated(mesh)
    boxed_policy = {"model": abstract_params(model.config), **({"value_head": params["value_head"]} if "value_head" in params else {})}
    state = TrainState(
        step=jax.device_put(jnp.zeros((), jnp.int32), repl),
        params=params,
        opt_state=jax.jit(optimizer.init, out_shardings=opt_state_shardings(optimizer, boxed_policy, mesh))(params),
        rng=jax.device_put(jax.random.PRNGKey(config.seed), repl),
        loss_state={arg: jax.device_put(jnp.zeros((), jnp.float32), repl) for arg, _ in spec.state_metrics},
        nonfinite_skipped=jax.device_put(jnp.zeros((), jnp.int32), repl),
    )
    state_shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
    ckpt = config.checkpoint
    checkpointer = Checkpointer(workdir, every_steps=ckpt.every_steps, every_minutes=ckpt.every_minutes,
                                keep_last=ckpt.keep_last, best_metric=ckpt.best_metric, best_mode=ckpt.best_mode)
    meta = {"model": config.model.name, "loss": spec.name, "reference": reference_meta,
            "param_shapes": checkpoint.param_shapes(state.params), "config": json.loads(config.to_json_best_effort())}
    first = 0
    restored = checkpointer.restore_latest(state)
    if restored is not None:
        first, state, loader_state, saved_meta = restored
        if saved_meta.get("reference", {}).get("fingerprint") != reference_meta["fingerprint"]:
            raise checkpoint.IncompatibleCheckpoint(
                f"the reference model ({reference_meta['source']}) differs from the one {checkpointer.directory}/{first} "
                "was trained against (fingerprints differ): the init source changed. Use a new --workdir."
            )
        loader.restore(loader_state)
        logging.info("resumed from %s/%d", checkpointer.directory, first)
    _truncate_metrics(workdir, first)  # rows past the restored step (or all, on a fresh start)
    if jax.process_index() == 0:  # written only once the checkpoint (if any) is known to fit this config
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
            f.write(config.to_json_best_effort(indent=2))
        with open(os.path.join(workdir, "data_stats.json"), "w", encoding="utf-8") as f:
            json.dump({"train": train_data.stats, "eval": eval_data.stats, "dropped_by_tokenization": loader.dropped}, f, indent=2)

    eval_loader = setup.make_loader(config, spec, eval_data, tokenizer, seed=config.seed + 1)
    eval_batches = [next(eval_loader) for _ in range(min(int(config.train.eval_batches), eval_loader.steps_per_epoch))]
    train_cache = eval_cache = None
    if mode == "cached":
        def cache_batches():
            cache_loader = setup.make_loader(config, spec, train_data, tokenizer, seed=config.seed)
            return (next(cache_loader) for _ in range(steps))
        train_cache, eval_cache = _cached_reference(config, step_spec, reference_params, cache_batches, eval_batches, mesh, workdir, steps)
        reference_params = None  # the reference model is not needed any more

    train_fn = jax.jit(
        functools.partial(train_step, step_spec, optimizer, lr_fn),
        in_shardings=(state_shardings, None, None),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )
    eval_fn = jax.jit(functools.partial(eval_step, step_spec))
    writer = MetricsWriter(workdir)
    peak = device_peak_flops(jax.devices()[0].device_kind)
    peak = peak * jax.device_count() if peak else None
    bar = tqdm(total=steps, initial=first, desc=f"{spec.name}", disable=jax.process_index() != 0, dynamic_ncols=True)
    last_time, last_step, tokens_since = time.perf_counter(), first, 0.0
    with sharding.activation_rules(mesh), Preemption() as preemption:
        for step in range(first, steps):
            batch = next(loader)
            if train_cache is not None:
                batch.update({k: _local_rows(v) for k, v in train_cache[step].items()})
            state, metrics = train_fn(state, setup.to_global(batch, mesh), reference_params)
            done = step + 1
            finite = bool(jax.device_get(metrics["finite"]))
            if not finite:
                if not config.train.skip_nonfinite:
                    checkpointer.close()
                    raise FloatingPointError(
                        f"non-finite loss or gradient norm at step {done} (loss {float(metrics['loss'])}, grad_norm "
                        f"{float(metrics['grad_norm'])}); the last good checkpoint is kept in {checkpointer.directory}. "
                        "Lower config.train.optimizer.lr, check the data, or set config.train.skip_nonfinite=True."
                    )
            if done % int(config.train.log_every) == 0 or done == steps:
                metrics = jax.device_get(metrics)
                now = time.perf_counter()
                tokens_since += float(metrics["tokens"])
                row = {k: v for k, v in metrics.items() if k != "finite"}
                row["nonfinite_skipped"] = int(jax.device_get(state.nonfinite_skipped))
                step_time = (now - last_time) / (done - last_step)
                row.update(step_time_s=step_time, tokens_per_s=tokens_since / (now - last_time))
                if peak:
                    length = next(v for k, v in batch.items() if k.endswith("input_ids")).shape[1]
                    flops = step_flops(model.config, spec, batch=int(config.train.global_batch_size), length=length, reference_mode=mode)
                    row["mfu"] = flops / step_time / peak
                writer.write(done, row)
                bar.set_postfix({k: f"{float(row[k]):.4g}" for k in ("loss", "rewards/margins", "kl", "tokens_per_s") if k in row})
                last_time, last_step, tokens_since = now, done, 0.0
            else:
                tokens_since += float(batch["attention_mask"].sum() if "attention_mask" in batch else
                                      batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum()) * jax.process_count()
            bar.update(1)
            eval_metrics = None
            if config.train.eval_every and done % int(config.train.eval_every) == 0 and done != steps:
                eval_metrics = _held_out(eval_fn, state, eval_batches, eval_cache, reference_params, mesh)
                writer.write(done, eval_metrics)
            stop = preemption.signal is not None or checkpointer.reached_preemption(done)
            checkpointer.save(done, state, loader.state(), meta, metrics=eval_metrics, force=stop or done == steps)
            if stop and done != steps:
                checkpointer.close()
                writer.close()
                bar.close()
                message = f"preempted ({preemption.signal or 'preemption notice'}) at step {done}: checkpoint saved in {checkpointer.directory}; rerun the same command to resume"
                logging.warning("%s", message)
                print(message, flush=True)
                return {"step": done, "preempted": True}
        bar.close()
        results = {"step": steps, "held_out": _held_out(eval_fn, state, eval_batches, eval_cache, reference_params, mesh)}
    checkpointer.close()
    writer.write(steps, results["held_out"])
    writer.close()
    if config.eval.judge:
        results.update(_generation_eval(config, spec, model, state.params["model"], eval_data, tokenizer, workdir))
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "eval.json"), "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return results


def _held_out(eval_fn, state, batches, cache, reference_params, mesh) -> dict:
    rows = []
    for i, batch in enumerate(batches):
        if cache is not None:
            batch = {**batch, **{k: _local_rows(v) for k, v in cache[i].items()}}
        rows.append(jax.device_get(eval_fn(state.params, setup.to_global(batch, mesh), reference_params, state.loss_state)))
    return {f"eval/{k}": float(np.mean([r[k] for r in rows])) for k in rows[0]} if rows else {}


def _generation_eval(config, spec, model, params, eval_data, tokenizer, workdir) -> dict:
    """Sample completions for held-out prompts, judge them, and compare with a baseline run."""
    from kto_jax.data.tokenize import render_prompt

    judge = get_judge(config.eval.judge)
    prompts = eval_prompts([ex.prompt for ex in eval_data.examples], int(config.eval.num_prompts))
    texts = [render_prompt(p, config.data.chat_template) for p in prompts]
    ids = [tokenizer.encode(t)[-int(config.data.max_prompt_length):] for t in texts]
    if spec.name == "csft":
        ids = [i + [tokenizer.token_id(setup.CONTROL_TOKENS[0])] for i in ids]
    completions = generate(
        model, params, ids, max_new_tokens=int(config.eval.max_new_tokens), eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id, temperature=float(config.eval.temperature), top_p=float(config.eval.top_p),
        batch_size=int(config.eval.batch_size), seed=config.seed,
    )
    decoded = [tokenizer.decode(c) for c in completions]
    flags = [bool(judge(p[-1][1], c)) for p, c in zip(prompts, decoded)]
    results = {"generation": judged_rate(flags)}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "samples.jsonl"), "w", encoding="utf-8") as f:
            for p, c, ok in zip(texts, decoded, flags):
                f.write(json.dumps({"prompt": p, "completion": c, "desirable": ok}) + "\n")
    if config.eval.baseline:
        baseline = os.path.join(os.path.expanduser(config.eval.baseline), "samples.jsonl")
        with open(baseline, encoding="utf-8") as f:
            base = {row["prompt"]: row["desirable"] for row in map(json.loads, f)}
        common = [(ok, base[p]) for p, ok in zip(texts, flags) if p in base]
        results["winrate"] = winrate([a for a, _ in common], [b for _, b in common])
    logging.info("judged desirable rate %.3f on %d held-out prompts", results["generation"]["desirable_rate"], len(flags))
    return results
