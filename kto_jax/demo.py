"""The embedded default, until the training engine lands: align a bigram LM on a synthetic task.

    python -m kto_jax.demo [--losses=kto,dpo,sft] [--steps=300]

A tiny "language model" (a learned bigram table, logits[t] = W[token_t]) writes a
3-token completion after a 1-token prompt. The exact judge calls a completion desirable
when at least two of its tokens are even. Feedback is collected once from the reference
model's own samples (about half desirable); then each loss in the registry trains a copy
of the reference on that fixed data, through the same path the real engine uses
(``sequence_logps`` -> registry loss -> optax), and the judged rate of the policy's
samples is reported before and after. It shows losses swapping by name and alignment
moving the judged rate; it is not a benchmark.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from kto_jax.logprobs import mean_logps, sequence_logps
from kto_jax.losses import LOSSES, get_loss

VOCAB, COMPLETION = 8, 3
_LOSSES = flags.DEFINE_list("losses", ["sft", "kto", "dpo"], "Registered loss names, or 'all'.")
_STEPS = flags.DEFINE_integer("steps", 300, "Optimizer steps per loss.")
_BATCH = flags.DEFINE_integer("batch", 32, "Examples (unary) or pairs (paired) per step.")
_LR = flags.DEFINE_float("lr", 0.05, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for data, init and sampling.")


def judge(tokens: np.ndarray) -> np.ndarray:
    """Desirable iff at least 2 of the 3 completion tokens are even (tokens: [N, 1 + 3])."""
    return (tokens[:, 1:] % 2 == 0).sum(-1) >= 2


def logits_fn(w: jax.Array, tokens: jax.Array) -> jax.Array:
    """Bigram LM: logits[b, t] = W[tokens[b, t]]  ([B, T, V])."""
    return w[tokens]


@jax.jit
def complete(w: jax.Array, prompts: jax.Array, key: jax.Array) -> jax.Array:
    """Ancestral-sampled completions of 1-token prompts: [n, 1 + COMPLETION]."""
    tokens = [prompts]
    for _ in range(COMPLETION):
        key, sub = jax.random.split(key)
        tokens.append(jax.random.categorical(sub, w[tokens[-1]]))
    return jnp.stack(tokens, axis=1)


def sample(w: jax.Array, key: jax.Array, n: int) -> np.ndarray:
    """n uniform prompts and the model's completions."""
    k_prompt, k_complete = jax.random.split(key)
    return np.asarray(complete(w, jax.random.randint(k_prompt, (n,), 0, VOCAB), k_complete))


def logps(w, tokens, length_normalized):
    mask = jnp.arange(tokens.shape[1]) >= 1  # completion tokens only
    sums, counts = sequence_logps(logits_fn(w, tokens), tokens, jnp.broadcast_to(mask, tokens.shape))
    return (mean_logps(sums, counts) if length_normalized else sums), counts


def loss_inputs(spec, w, w_ref, batch):
    """Positional loss inputs of ``spec.kind`` from token arrays (the engine's job, in miniature)."""
    lp = lambda params, toks: logps(params, toks, spec.length_normalized)[0]  # noqa: E731
    if spec.kind == "sft":
        return (lp(w, batch["tokens"]), logps(w, batch["tokens"], False)[1])
    if spec.kind == "unary":
        tokens = batch["tokens"]
        args = [lp(w, tokens), lp(w_ref, tokens)]
        if spec.needs_kl:  # KL sequence i: prompt of i with completion of i+1 (mismatched)
            kl = jnp.concatenate([tokens[:, :1], jnp.roll(tokens[:, 1:], -1, axis=0)], axis=1)
            args += [jax.lax.stop_gradient(lp(w, kl)), lp(w_ref, kl)]
        return (*args, batch["desirable"])
    chosen, rejected = batch["chosen"], batch["rejected"]
    args = (lp(w, chosen), lp(w, rejected))
    return args + ((lp(w_ref, chosen), lp(w_ref, rejected)) if spec.needs_reference else ())


def make_dataset(w_ref, key, n=4096):
    """Unary feedback on reference samples, and pairs (one desirable, one not, same prompt)."""
    k1, k2 = jax.random.split(key)
    a = sample(w_ref, k1, n)
    b = np.asarray(complete(w_ref, jnp.asarray(a[:, 0]), k2))  # a second answer to each prompt
    ja, jb = judge(a), judge(b)
    pair = ja != jb
    chosen = np.where(ja[:, None], a, b)[pair]
    rejected = np.where(ja[:, None], b, a)[pair]
    return {"tokens": a, "desirable": ja}, {"chosen": chosen, "rejected": rejected}


def train(name, w_ref, unary, pairs, rng):
    spec = get_loss(name)
    hparams = spec.hyperparameters()
    data = pairs if spec.kind == "paired" else unary
    if spec.kind == "sft":  # SFT on the desirable examples only
        data = {k: v[unary["desirable"]] for k, v in unary.items()}
    optimizer = optax.adam(_LR.value)

    @jax.jit
    def step(w, opt_state, batch):
        def loss_fn(w):
            return spec.fn(*loss_inputs(spec, w, w_ref, batch), **hparams)

        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(w)
        updates, opt_state = optimizer.update(grads, opt_state, w)
        return optax.apply_updates(w, updates), opt_state, loss

    w, opt_state = w_ref, optimizer.init(w_ref)
    size = len(next(iter(data.values())))
    for _ in range(_STEPS.value):
        idx = rng.choice(size, _BATCH.value, replace=False)
        w, opt_state, loss = step(w, opt_state, {k: jnp.asarray(v[idx]) for k, v in data.items()})
    return w, float(loss)


def judged_rate(w, key, n=4096) -> float:
    return float(judge(sample(w, key, n)).mean())


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # quiet JAX's backend probing on CPU hosts
    names = sorted(n for n, s in LOSSES.items() if not s.token_level) if _LOSSES.value == ["all"] else _LOSSES.value
    specs = [get_loss(n) for n in names]  # unknown names fail here, before any work
    for spec in specs:
        if spec.token_level:
            raise app.UsageError(f"--losses: {spec.name!r} needs per-token values from a model's value head; "
                                 "the demo's bigram model has none. Drop it from --losses.")
    key = jax.random.PRNGKey(_SEED.value)
    k_init, k_data, k_eval = jax.random.split(key, 3)
    w_ref = 0.1 * jax.random.normal(k_init, (VOCAB, VOCAB))
    unary, pairs = make_dataset(w_ref, k_data)
    print(f"data: {len(unary['tokens'])} unary examples ({unary['desirable'].mean():.1%} desirable), "
          f"{len(pairs['chosen'])} pairs; judge: >= 2 of 3 completion tokens even")
    base = judged_rate(w_ref, k_eval)
    print(f"{'loss':<18} {'kind':<7} {'judged desirable':>17} {'final loss':>11} {'time':>6}")
    print(f"{'(reference)':<18} {'':<7} {base:>17.1%}")
    for spec in specs:
        start = time.perf_counter()
        w, loss = train(spec.name, w_ref, unary, pairs, np.random.default_rng(_SEED.value))
        rate = judged_rate(w, k_eval)
        print(f"{spec.name:<18} {spec.kind:<7} {rate:>17.1%} {loss:>11.4f} {time.perf_counter() - start:>5.1f}s")


if __name__ == "__main__":
    app.run(main)
