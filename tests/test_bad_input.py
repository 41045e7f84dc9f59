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
import os
import re
from types import SimpleNamespace

import pytest

from kto_jax.config import base_config
from kto_jax.errors import InputError
from kto_jax.train import __main__ as train_cli
from kto_jax.train import loop
from tests import ckpt_helpers as H
from tests.bad_input_cases import CASES, CLI, RUN, Ctx
from tests.train_helpers import tail


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
