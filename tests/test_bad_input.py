"""Bad input: each case must fail with a message naming the field or file and the fix, and a
failed start on an existing run's workdir must leave every file of that run as it was.

Failure modes (what you did -> what you get); docs/failure-modes.md lists the same:

CLI and configs
- unknown loss (experiments/tiny.py:loss=nope) -> unknown loss 'nope' (config.loss.name); known losses: apo_down, ...
- unknown experiment argument (experiments/tiny.py:lr=1) -> experiments/tiny.py: unknown arguments ['lr']; use loss, model, steps, init
- extra positional argument -> unexpected arguments: ['extra']
- misspelled key (--config.train.lrr=1) -> --config.train.lrr: config.train has no field 'lrr'; its fields: [...]
- a hyperparameter the loss does not take (loss=dpo --config.loss.desirable_weight=2) -> config.loss has no field
  'desirable_weight' ... Loss 'dpo' takes ['beta', 'label_smoothing']; for another loss choose it in the experiment
  argument (experiments/tiny.py:loss=NAME)
- unknown model preset -> config.model.name='tiny-2m' is neither a preset (tiny-1m, ...) nor a model folder
- bad reference mode -> config.reference.mode='foo': must be one of 'model', 'cached'; set 'model' (...)
- cached reference for a per-token loss -> loss 'ppo_offline' needs per-token reference log-probs: set config.reference.mode='model'
- mesh not matching the devices -> config.mesh: mesh {'data': 2, 'fsdp': 1, 'tensor': 1} needs 2 devices; there are 1
- batch not splitting -> config.train.global_batch_size=9 with num_microbatches=2 must split evenly over the 1
  data-parallel devices: use a multiple of 2
- one example per microbatch with KTO -> loss 'kto' estimates KL within each microbatch and needs at least 2 examples
  per microbatch; got 1. Raise config.train.global_batch_size or lower num_microbatches.
- max_prompt_length >= max_length -> need 0 < max_prompt_length < max_length; got max_prompt_length=32, max_length=32 (config.data)
- unknown chat template -> unknown chat template 'nope' (config.data.chat_template); known: halos, hh, plain, tokenizer
- best_mode not min/max -> config.checkpoint.best_mode='median': must be one of 'min', 'max'; set 'min' for a loss, ...

Tokenizers
- vocabulary larger than the model's -> config.data.tokenizer='PATH' has 1001 tokens but model 'tiny-1m' embeds only
  384: use the model's own tokenizer (config.data.tokenizer='' for a model folder) or a model with vocab_size >= 1001
- folder without tokenizer.json -> 'PATH/tokenizer.json' not found: load_tokenizer needs a tokenizer.json (the fast-tokenizer file)

Data
- unknown source -> config.data.sources: unknown dataset 'nope'; known: hh, oasst, shp, synthetic, ultrafeedback
- unknown builder config (synthetic/nope) -> dataset 'synthetic' has no config 'nope' (config.data.sources=...); its configs: paired, unary
- unknown split -> dataset 'synthetic' has no split 'nope'; splits: ['test', 'train', 'validation']
- paired loss on unary data -> loss 'dpo' needs paired data (chosen and rejected per prompt), but
  config.data.sources='synthetic/unary' is unary: use a unary loss (kto, kto_zero, ...) or a paired source
- malformed JSON line in a manual_dir file -> MANUAL/helpful-base/train.jsonl.gz, line 2: malformed JSON (...)
  (set skip_bad_records=True to skip and count such records)

Init sources and checkpoints
- unknown init scheme -> config.init.source='s3://bucket/run': use '', 'hf:PATH' or 'orbax:WORKDIR[@STEP]'
- orbax:DIR with no checkpoint -> no checkpoint in 'DIR/checkpoints' (config.init.source=orbax:DIR) ...; nothing is created
- orbax:RUN@8 where RUN has no step 8 -> 'RUN/checkpoints' has no step 8; it has [28, 30]
- orbax:RUN of another model -> config.init.source=orbax:RUN: that run trained model 'tiny-1m', whose shapes differ
  from config.model; set config.model.name to the same model
- hf:/nonexistent -> config.init.source=hf:/nonexistent: '/nonexistent' is not a folder (...)
- resume with another model -> IncompatibleCheckpoint: checkpoint RUN/checkpoints/30 was written for another model
  (config model 'tiny-1m'); param shapes differ, e.g. [...]. Use a new --workdir, or the config the checkpoint was
  written with (its config.json). The run's config.json is not touched. (Only reached with --resume_with_changes:
  without it the config check below comes first.)
- resume with a changed config -> RUN holds a run trained with another config (2 field(s) differ: config.loss.beta:
  0.1 (saved) -> 0.2 (now); config.model.name: 'tiny-1m' (saved) -> 'tiny-5m' (now)). Use a new --workdir for the new
  config, or pass --resume_with_changes to continue this run with it (recorded in config_changes.jsonl)
- the only checkpoint unreadable -> UnreadableCheckpoint: no readable checkpoint in RUN/checkpoints (RUN/checkpoints/30:
  ...). Delete the unreadable checkpoints (or move them away) to start this run afresh, or use a new --workdir.
- (tests/test_checkpoint.py) newest checkpoint unreadable, an older one present -> warning "checkpoint
  RUN/checkpoints/30 is unreadable (...); falling back to the previous one (the unreadable one is kept as
  RUN/checkpoints/30.unreadable)", "resumed from RUN/checkpoints/28", and the run finishes; non-finite loss ->
  FloatingPointError: non-finite loss or gradient norm at step N (loss nan, grad_norm nan); the last good checkpoint
  is kept in RUN/checkpoints. Lower config.train.optimizer.lr, check the data, or set config.train.skip_nonfinite=True.

The CLI cases run ``python -m kto_jax.train`` (all at once, in the background); the others
call ``kto_jax.train.loop.run(config, workdir)`` in-process with the CLI's config plus the bad
field, on a fresh copy of the reference run of tests/ckpt_helpers.py.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import gzip
import os
import re
import shutil
from collections.abc import Callable
from types import SimpleNamespace

import jax
import pytest

from kto_jax.config import base_config
from kto_jax.errors import InputError
from kto_jax.train import __main__ as train_cli
from kto_jax.train import loop
from tests import ckpt_helpers as H
from tests.train_helpers import tail

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


def new_ctx(root: str, name: str, reference: dict) -> Ctx:
    tmp = os.path.join(root, name)
    os.makedirs(tmp)
    workdir = H.copy_run(reference["workdir"], os.path.join(tmp, "run"))
    return Ctx(data_dir=reference["data_dir"], workdir=workdir, tmp=tmp, reference=reference["workdir"])


def launch_cli(root: str, name: str, reference: dict) -> dict:
    case = CASES[name]
    ctx = new_ctx(root, name, reference)
    if case.prepare:
        case.prepare(ctx)
    before = H.snapshot(ctx.workdir)
    args = ["-m", "kto_jax.train", "--workdir", ctx.workdir, *case.make(ctx)]
    result = H.Proc(args, ctx.tmp, "cli").result()
    return {**result, "before": before, "after": H.snapshot(ctx.workdir), "rows": H.rows(ctx.workdir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data_dir):
    return H.reference_run(tmp_path_factory, synthetic_data_dir)


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, reference):
    """Every CLI case started at once in the background; ``results[name].result()`` waits for one."""
    root = str(tmp_path_factory.mktemp("bad_cli"))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=len(CLI))
    futures = {name: pool.submit(launch_cli, root, name, reference) for name in CLI}
    yield futures
    pool.shutdown(wait=True)


def assert_unchanged(before: dict, after: dict) -> None:
    diff = H.snapshot_diff(before, after)
    assert diff == {"removed": [], "added": [], "changed": []}, f"the failed start changed the run's files: {diff}"


@pytest.mark.parametrize("name", RUN)
def test_bad_input_in_process(name, reference, cli_results, tmp_path, monkeypatch):
    from kto_jax.train import loop

    H.reuse_random_init(monkeypatch)  # every case fails before training
    case = CASES[name]
    ctx = new_ctx(str(tmp_path), "case", reference)
    config = case.make(ctx)
    before = H.snapshot(ctx.workdir)
    with pytest.raises(case.exc) as error:
        loop.run(config, ctx.workdir, resume_with_changes=case.resume_with_changes)
    message = f"{type(error.value).__name__}: {error.value}"
    assert all(re.search(p, message, re.S) for p in case.error), message
    assert_unchanged(before, H.snapshot(ctx.workdir))


@pytest.mark.parametrize("name", CLI)
def test_bad_input_cli(name, cli_results):
    case, result = CASES[name], cli_results[name].result()
    output = result["stderr"] + result["stdout"]
    assert result["rc"] != 0, f"rc 0:\n{tail(output)}"
    missing = [p for p in case.error if not re.search(p, output, re.S)]
    assert not missing, f"{missing} not in:\n{tail(output, 8)}"
    assert_unchanged(result["before"], result["after"])


def test_init_from_a_nonexistent_orbax_dir_creates_nothing(tmp_path, reference):
    from kto_jax import checkpoint

    missing = tmp_path / "typo"
    with pytest.raises(FileNotFoundError):
        checkpoint.load_params(str(missing), H.random_init("tiny-1m")[1])
    assert not missing.exists(), sorted(str(p) for p in missing.rglob("*"))


@pytest.mark.parametrize("input_error", [False, True], ids=["bug", "input_error"])
def test_only_input_errors_are_one_line(input_error, tmp_path, monkeypatch, capsys):
    """The CLI's main, in-process, with a check inside prepare raising: an InputError is one
    ``error:`` line and exit status 2; a ValueError that is not one (a bug) escapes main, so the
    interpreter prints its traceback and exits 1, and no ``error:`` line is printed."""
    error = InputError("config.train.steps=3: must be 4; set 4") if input_error else ValueError("boom")

    def check(*args, **kwargs):
        raise error

    monkeypatch.setattr(loop, "make_plan", check)  # the first check of kto_jax.train.loop.prepare
    monkeypatch.setattr(train_cli, "_CONFIG", SimpleNamespace(value=base_config()))
    monkeypatch.setattr(train_cli, "_WORKDIR", SimpleNamespace(value=str(tmp_path / "run")))
    monkeypatch.setattr(train_cli, "_RESUME_WITH_CHANGES", SimpleNamespace(value=False))
    monkeypatch.setattr(train_cli, "quiet_by_default", lambda: None)  # leaves this process's logging alone
    assert train_cli.flags.FLAGS["verbosity"].value < 1  # with --verbosity=1 an InputError keeps its traceback
    if input_error:
        with pytest.raises(SystemExit) as exit_:
            train_cli.main(["kto_jax.train"])
        assert exit_.value.code == 2
        assert capsys.readouterr().err.splitlines() == ["error: config.train.steps=3: must be 4; set 4"]
    else:
        with pytest.raises(ValueError, match="boom") as raised:
            train_cli.main(["kto_jax.train"])
        assert not isinstance(raised.value, InputError)
        assert "error:" not in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")
