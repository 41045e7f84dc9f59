"""The bad-input cases of tests/test_bad_input.py (its docstring lists each with its message): a case
is a CLI run (``python -m kto_jax.train ARGS``) or an in-process ``loop.run`` on a copy of the
reference run of tests/ckpt_helpers.py, and the regexes its error must match."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from collections.abc import Callable

import jax

from tests import ckpt_helpers as H

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@dataclasses.dataclass
class Ctx:
    data_dir: str
    workdir: str  # a fresh copy of the reference run
    tmp: str
    reference: str  # the reference run itself (read only)


@dataclasses.dataclass
class Case:
    kind: str  # "cli": python -m kto_jax.train ARGS --workdir W; "run": loop.run(config, W) in-process
    make: Callable  # cli: Ctx -> args (the --config argument and flags); run: Ctx -> config
    error: tuple  # regexes that must all match the message (stderr + stdout for "cli")
    exc: type = Exception
    prepare: Callable | None = None  # Ctx -> None: changes the workdir before the snapshot
    # in-process cases run on a finished run with a changed config; with resume_with_changes the
    # resume check lets the change through so the check under test is the one that fails
    resume_with_changes: bool = True


def cli(arg="loss=kto", *flags):
    return lambda ctx: ["--config", f"{H.TINY}:{arg}", *H.run_flags(ctx.data_dir), *flags]


def run(*flags, arg=f"loss=kto,steps={H.STEPS}", edit=None):
    """The reference run's config plus ``flags`` (``--config.a.b=v``), and ``edit(config, ctx)``."""

    def make(ctx):
        config = H.config_for(ctx.data_dir, arg, tuple(f.format(**vars(ctx)) for f in flags), lock=edit is None)
        if edit:
            edit(config, ctx)
        return config

    return make


def big_vocab_tokenizer(ctx) -> str:
    from tokenizers import Tokenizer, models

    path = os.path.join(ctx.tmp, "big_vocab")
    os.makedirs(path)
    vocab = {f"w{i}": i for i in range(1000)} | {"</s>": 1000}
    Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0")).save(os.path.join(path, "tokenizer.json"))
    return path


def set_tokenizer(maker):
    def edit(config, ctx):
        config.data.tokenizer = maker(ctx)

    return edit


def empty_folder(ctx) -> str:
    path = os.path.join(ctx.tmp, "no_tokenizer")
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write("{}")
    return path


def malformed_hh(config, ctx):
    manual = os.path.join(ctx.tmp, "manual")
    shutil.copytree(os.path.join(FIXTURES, "hh"), manual)
    path = os.path.join(manual, "helpful-base", "train.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    lines[1] = lines[1][:30]  # a line cut short
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    config.data.update(
        dict(
            sources="hh/helpful-base",
            train_split="train",
            eval_split="test",
            manual_dir=manual,
            data_dir=os.path.join(ctx.tmp, "tfds"),
        )
    )


def dpo_with_kto_weight(config, ctx):
    from kto_jax.config import loss_config

    config.loss = loss_config("dpo")
    config.loss.desirable_weight = 2.0


def corrupt_only_checkpoint(ctx):
    steps = sorted(int(d) for d in os.listdir(os.path.join(ctx.workdir, "checkpoints")) if d.isdigit())
    for step in steps[:-1]:
        shutil.rmtree(os.path.join(ctx.workdir, "checkpoints", str(step)))
    with open(os.path.join(ctx.workdir, "checkpoints", str(steps[-1]), "state", "_METADATA"), "w") as f:
        f.write("not json")


def _edit(**fields):
    def edit(config, ctx):
        for dotted, value in fields.items():
            H.set_path(config, dotted.replace("__", "."), value.format(**vars(ctx)))

    return edit


NEWEST = H.STEPS  # the reference run keeps checkpoints 28 and 30
N = jax.device_count()
CASES = {
    # ------------------------------------------------ CLI
    "cli_unknown_loss": Case(
        "cli", cli("loss=nope"), (r"unknown loss 'nope'", r"config\.loss\.name", r"known losses: .*\bkto\b")
    ),
    "cli_unknown_experiment_argument": Case(
        "cli",
        cli("loss=kto,lr=1"),
        (r"experiments/tiny\.py: unknown arguments \['lr'\]", r"use loss, model, steps, init"),
    ),
    "cli_extra_positional_argument": Case(
        "cli", lambda ctx: cli()(ctx) + ["extra"], (r"unexpected arguments: \['extra'\]",)
    ),
    "cli_misspelled_config_key": Case("cli", cli("loss=kto", "--config.train.lrr=1"), (r"config\.train\.lrr",)),
    "cli_loss_hyperparameter_the_loss_does_not_take": Case(
        "cli", cli("loss=dpo", "--config.loss.desirable_weight=2"), (r"config\.loss\.desirable_weight", r"\bbeta\b")
    ),
    # ------------------------------------------------ configs
    "unknown_model_preset": Case(
        "run", run("--config.model.name=tiny-2m"), (r"config\.model\.name='tiny-2m'", r"neither a preset \(tiny-1m, ")
    ),
    "loss_hyperparameter_the_loss_does_not_take": Case(
        "run",
        run(edit=dpo_with_kto_weight),
        (
            r"config\.loss has \['desirable_weight'\]",
            r"loss 'dpo' does not take",
            r"'beta'",
            r"experiments/tiny\.py:loss=dpo",
        ),
    ),
    "bad_reference_mode": Case(
        "run", run("--config.reference.mode=foo"), (r"config\.reference\.mode='foo'", r"one of 'model', 'cached'")
    ),
    "cached_reference_for_a_per_token_loss": Case(
        "run",
        run("--config.reference.mode=cached", arg="loss=ppo_offline"),
        (r"'ppo_offline' needs per-token reference log-probs", r"set config\.reference\.mode='model'"),
    ),
    "mesh_not_matching_devices": Case(
        "run",
        run(edit=lambda c, ctx: c.mesh.update(dict(data=N + 1))),
        (r"config\.mesh", rf"'data': {N + 1}", rf"needs {N + 1} devices; there are {N}"),
    ),
    "bad_best_mode": Case(
        "run",
        run("--config.checkpoint.best_mode=median"),
        (r"config\.checkpoint\.best_mode='median'", r"one of 'min', 'max'"),
    ),
    "batch_not_splitting_into_microbatches": Case(
        "run",
        run("--config.train.global_batch_size=9", "--config.train.num_microbatches=2"),
        (r"config\.train\.global_batch_size=9 with num_microbatches=2 must split evenly", r"use a multiple of 2"),
    ),
    "kl_needs_two_examples_per_microbatch": Case(
        "run",
        run("--config.train.global_batch_size=2", "--config.train.num_microbatches=2"),
        (r"'kto' estimates KL within each microbatch", r"got 1", r"config\.train\.global_batch_size"),
    ),
    "prompt_length_not_below_max_length": Case(
        "run",
        run("--config.data.max_prompt_length=32"),
        (r"0 < max_prompt_length < max_length", r"max_prompt_length=32, max_length=32", r"config\.data"),
    ),
    "unknown_chat_template": Case(
        "run",
        run("--config.data.chat_template=nope"),
        (r"'nope'", r"config\.data\.chat_template", r"known: halos, hh, plain, tokenizer"),
    ),
    # ------------------------------------------------ tokenizers
    "tokenizer_vocab_larger_than_model": Case(
        "run",
        run(edit=set_tokenizer(big_vocab_tokenizer)),
        (
            r"tokenizer='.*big_vocab' has 1001 tokens",
            r"'tiny-1m' embeds only 384",
            r"config\.model\.name",
            r"config\.data\.tokenizer",
        ),
    ),
    "tokenizer_folder_without_tokenizer_json": Case(
        "run",
        run(edit=set_tokenizer(empty_folder)),
        (r"'.*no_tokenizer/tokenizer\.json' not found", r"needs a tokenizer\.json"),
        exc=FileNotFoundError,
    ),
    # ------------------------------------------------ data
    "unknown_source": Case(
        "run",
        run("--config.data.sources=nope"),
        (r"config\.data\.sources", r"unknown dataset 'nope'", r"known: hh, oasst, shp, synthetic, ultrafeedback"),
    ),
    "unknown_source_config": Case(
        "run",
        run("--config.data.sources=synthetic/nope"),
        (r"synthetic/nope", r"config\.data\.sources", r"paired", r"unary"),
    ),
    "unknown_split": Case(
        "run",
        run("--config.data.train_split=nope"),
        (r"'synthetic' has no split 'nope'", r"splits: \['test', 'train', 'validation'\]"),
    ),
    "paired_loss_on_unary_data": Case(
        "run",
        run("--config.data.sources=synthetic/unary", arg="loss=dpo"),
        (r"loss 'dpo' needs paired data", r"config\.data\.sources='synthetic/unary' is unary", r"use a unary loss"),
    ),
    "malformed_json_line_in_manual_dir": Case(
        "run",
        run(edit=malformed_hh),
        (r"manual/helpful-base/train\.jsonl\.gz, line 2: malformed JSON", r"skip_bad_records=True"),
    ),
    # ------------------------------------------------ init sources and checkpoints
    "init_source_unknown_scheme": Case(
        "run",
        run(edit=_edit(init__source="s3://bucket/run")),
        (r"config\.init\.source='s3://bucket/run'", r"use '', 'hf:PATH' or 'orbax:WORKDIR\[@STEP\]'"),
    ),
    # a folder under tmp, not /nonexistent: run as root, orbax would create /nonexistent/checkpoints
    "init_orbax_nonexistent": Case(
        "run",
        run(edit=_edit(init__source="orbax:{tmp}/nonexistent")),
        (r"no checkpoint in '.*/nonexistent/checkpoints'", r"config\.init\.source=orbax:.*/nonexistent"),
        exc=FileNotFoundError,
    ),
    "init_orbax_missing_step": Case(
        "run",
        run(edit=_edit(init__source="orbax:{reference}@8")),
        (r"checkpoints' has no step 8", r"it has \[28, 30\]"),
        exc=FileNotFoundError,
    ),
    "init_orbax_of_another_model": Case(
        "run",
        run("--config.model.name=tiny-5m", edit=_edit(init__source="orbax:{reference}")),
        (r"config\.init\.source=orbax:", r"trained model 'tiny-1m'", r"set config\.model\.name to the same model"),
    ),
    "init_hf_nonexistent": Case(
        "run", run(edit=_edit(init__source="hf:/nonexistent")), (r"config\.init\.source", r"/nonexistent")
    ),
    "resume_with_a_different_model": Case(
        "run",
        run("--config.model.name=tiny-5m"),
        (
            rf"checkpoint .*/checkpoints/{NEWEST} was written for another model",
            r"'tiny-1m'",
            r"param shapes differ",
            r"new --workdir",
        ),
        exc=ValueError,
    ),
    "resume_with_a_changed_config": Case(
        "run",
        run("--config.model.name=tiny-5m", "--config.loss.beta=0.2"),
        (
            r"holds a run trained with another config",
            r"config\.model\.name: 'tiny-1m' \(saved\) -> 'tiny-5m' \(now\)",
            r"config\.loss\.beta: 0\.1 \(saved\) -> 0\.2 \(now\)",
            r"new --workdir",
            r"--resume_with_changes",
        ),
        resume_with_changes=False,
    ),
    # extending the run (steps is resumable) makes it restore the newest checkpoint
    "only_checkpoint_corrupted": Case(
        "cli",
        cli(f"loss=kto,steps={H.STEPS + 2}"),
        (rf"checkpoints/{NEWEST}\b[^\n]*(delete|remove|new --workdir)",),
        prepare=corrupt_only_checkpoint,
    ),
}

CLI = sorted(name for name, case in CASES.items() if case.kind == "cli")
RUN = sorted(name for name, case in CASES.items() if case.kind == "run")
