"""A run's record can be trusted (kto_jax/train/rules.py, kto_jax/train/record.py, the CLI).

- Every value rule rejects a bad value and accepts every shipped experiment's values.
- Bad CLI input, on a fresh workdir and on a finished run: exit status 2, exactly one
  ``error: ...`` line naming the field, no traceback, and the workdir untouched (byte for byte;
  a fresh workdir is not even created).
- Rerunning a finished run: the same config is a no-op; another config is an error naming each
  field with both values; RESUMABLE fields (more steps, eval settings) continue the run and
  are recorded in config_changes.jsonl; ``--resume_with_changes`` forces the rest, recorded too.
"""

from __future__ import annotations

import concurrent.futures
import glob
import json
import math
import os
import re

import ml_collections
import pytest

from kto_jax.config import base_config
from kto_jax.losses import LOSSES
from kto_jax.train import rules
from tests import ckpt_helpers as H
from tests.train_helpers import tail

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = (-1, 0, 1.5, 2, -0.5, float("nan"), "nope", 10**6)


# ---------------------------------------------------------------- the rules table


def _experiment_configs():
    from kto_jax.sweeps import load_config

    for path in sorted(glob.glob(os.path.join(REPO, "experiments", "*.py"))):
        if os.path.basename(path).startswith("_"):
            continue
        yield os.path.basename(path), load_config(path)


def test_every_rule_names_a_real_field():
    fields = set(rules.flatten(base_config().to_dict()))
    loss_fields = {f"loss.{k}" for spec in LOSSES.values() for k in {**spec.defaults, **spec.options()}}
    unknown = [r.field for r in rules._table() if r.field not in fields | loss_fields]
    assert not unknown, f"rules for fields no config has: {unknown}"


def test_every_rule_rejects_some_value_and_accepts_the_default():
    defaults = rules.flatten(base_config().to_dict())
    loss_defaults = {f"loss.{k}": v for spec in LOSSES.values() for k, v in {**spec.defaults, **spec.options()}.items()}
    for rule in rules._table():
        default = defaults.get(rule.field, loss_defaults.get(rule.field))
        if rule.losses and not rule.other_losses:  # a rule of some losses only: their default
            default = LOSSES[rule.losses[0]].defaults[rule.field.removeprefix("loss.")]
        assert rule.ok(default), f"{rule.field}: its default {default!r} breaks its own rule"
        assert not all(rule.ok(v) for v in CANDIDATES), f"{rule.field}: accepts every value, so it checks nothing"


@pytest.mark.parametrize(
    "field,bad,good",
    [
        ("train.optimizer.lr", [0, -1e-4, math.inf, math.nan], [5e-7, 1e-3]),
        ("loss.beta", [0, -1], [0.1, 2.0]),
        ("eval.temperature", [-1, -1e-9], [0.0, 1.0]),
        ("eval.top_p", [0, 1.0001, -0.1], [1.0, 0.95]),
        ("checkpoint.keep_last", [0, -1, 1.5], [1, 2]),
        ("train.steps", [-5, 2.5], [0, 100]),
        ("train.optimizer.warmup_ratio", [1.0, -0.1], [0.0, 0.1]),
        ("data.holdout_fraction", [1.0, -0.1], [0.0, 0.5]),
        ("data.desirable_fraction", [0.0, 1.1], [1.0, 0.1]),
        ("loss.label_smoothing", [0.5, -0.1], [0.0, 0.2]),
        ("mesh.data", [0, -2], [-1, 1, 8]),
        ("model.compute_dtype", ["float99", "int8", "fp32"], ["float32", "bfloat16"]),
    ],
)
def test_rule_boundaries(field, bad, good):
    rule = next(r for r in rules._table() if r.field == field)
    assert [v for v in bad if rule.ok(v)] == [], f"{field} accepts bad values"
    assert [v for v in good if not rule.ok(v)] == [], f"{field} rejects good values"


def test_a_rule_of_one_loss_holds_for_that_loss_only():
    """label_smoothing is in [0, 0.5) for DPO's label noise, in (0, 1) for EXO's log(eps)."""
    for loss, bad, good in (("exo_pair", [0.0, 1.0], [1e-3, 0.6]), ("dpo", [0.5, 0.6], [0.0, 0.2])):
        config = base_config()
        config.loss = ml_collections.ConfigDict({"name": loss, "beta": 0.1, "label_smoothing": 0.0})
        for value, ok in [(v, False) for v in bad] + [(v, True) for v in good]:
            config.loss.label_smoothing = value
            lines = rules.problems(config)
            assert (lines == []) == ok, (loss, value, lines)
            assert ok or lines[0].startswith(f"config.loss.label_smoothing={value!r}: must be in "), lines


def test_every_shipped_experiment_satisfies_the_rules():
    bad = {name: rules.problems(config) for name, config in _experiment_configs()}
    assert {k: v for k, v in bad.items() if v} == {}


def test_problems_name_field_value_rule_and_fix():
    config = base_config()
    config.train.optimizer.lr = -1.0
    config.eval.top_p = 1.5
    lines = rules.problems(config)
    assert len(lines) == 2, lines
    assert re.fullmatch(r"config\.train\.optimizer\.lr=-1\.0: must be > 0; set .+", lines[0]), lines[0]
    assert re.fullmatch(r"config\.eval\.top_p=1\.5: must be in \(0, 1\]; set .+", lines[1]), lines[1]
    with pytest.raises(rules.InputError, match="lr=-1.0"):
        rules.check_values(config)


def test_config_diff_and_what_may_change_on_resume():
    saved = {"train": {"steps": 30, "optimizer": {"lr": 1e-4}}, "eval": {"top_p": 1.0}, "seed": 0}
    new = {"train": {"steps": 40, "optimizer": {"lr": 1e-4}}, "eval": {"top_p": 0.9}, "seed": 1, "extra": 2}
    diff = rules.config_diff(saved, new)
    assert diff == [("eval.top_p", 1.0, 0.9), ("extra", rules.ABSENT, 2), ("seed", 0, 1), ("train.steps", 30, 40)]
    assert rules.disallowed_on_resume(diff) == [("extra", rules.ABSENT, 2), ("seed", 0, 1)]
    for field in ("loss.beta", "train.optimizer.lr", "data.sources", "model.name", "init.source", "reference.mode"):
        assert not rules.resumable(field), field
    for field in ("checkpoint.keep_last", "eval.num_prompts", "eval.api.model", "train.steps", "mesh.data"):
        assert rules.resumable(field), field


# ---------------------------------------------------------------- bad CLI input, fresh and finished


# name -> (flags or {"arg": experiment argument} or {"config": file}, regex the error line must match)
CASES = {
    "negative_lr": (["--config.train.optimizer.lr=-1"], r"config\.train\.optimizer\.lr=-1\.0: must be > 0"),
    "negative_beta": (["--config.loss.beta=-1"], r"config\.loss\.beta=-1\.0: must be > 0"),
    "negative_temperature": (["--config.eval.temperature=-1"], r"config\.eval\.temperature=-1\.0: must be >= 0"),
    "keep_last_zero": (
        ["--config.checkpoint.keep_last=0"],
        r"config\.checkpoint\.keep_last=0: must be an integer >= 1",
    ),
    "negative_steps": (["--config.train.steps=-5"], r"config\.train\.steps=-5: must be an integer >= 0"),
    "unknown_judge": (["--config.eval.judge=nope"], r"unknown judge 'nope' \(config\.eval\.judge\)"),
    "top_p_above_one": (["--config.eval.top_p=1.5"], r"config\.eval\.top_p=1\.5: must be in \(0, 1\]"),
    "bad_compute_dtype": (
        ["--config.model.compute_dtype=float99"],
        r"config\.model\.compute_dtype='float99': must be one of",
    ),
    "bad_param_dtype": (["--config.model.param_dtype=int8"], r"config\.model\.param_dtype='int8': must be one of"),
    "misspelled_key": (["--config.train.lrr=1"], r"--config\.train\.lrr: config\.train has no field 'lrr'"),
    "hyperparameter_of_another_loss": (["--config.loss.label_smoothing=0.1"], r"Loss 'kto' takes \[.*\]"),
    "unknown_loss": ({"arg": f"loss=nope,steps={H.STEPS}"}, r"unknown loss 'nope' \(config\.loss\.name\)"),
    "unknown_experiment_argument": ({"arg": "lr=1"}, r"experiments/tiny\.py: unknown arguments \['lr'\]"),
    "missing_experiment_file": ({"config": "experiments/nope.py"}, r"--config: .*No such file.*experiments/nope\.py"),
    "unknown_model": (["--config.model.name=tiny-2m"], r"config\.model\.name='tiny-2m' is neither a preset"),
    "bad_reference_mode": (
        ["--config.reference.mode=foo"],
        r"config\.reference\.mode='foo': must be one of 'model', 'cached'",
    ),
    "mesh_needs_more_devices": (["--config.mesh.data=2"], r"config\.mesh: mesh .* needs 2 devices; there are 1"),
    "batch_not_splitting": (
        ["--config.train.global_batch_size=9", "--config.train.num_microbatches=2"],
        r"config\.train\.global_batch_size=9 with num_microbatches=2 must split evenly",
    ),
    "kto_one_example_per_microbatch": (
        ["--config.train.global_batch_size=1"],
        r"loss 'kto' estimates KL .* needs at least 2",
    ),
    "prompt_not_shorter_than_max_length": (
        ["--config.data.max_prompt_length=32"],
        r"max_prompt_length=32, max_length=32",
    ),
    "unknown_chat_template": (
        ["--config.data.chat_template=nope"],
        r"unknown chat template 'nope' \(config\.data\.chat_template\)",
    ),
    "bad_best_mode": (
        ["--config.checkpoint.best_mode=median"],
        r"config\.checkpoint\.best_mode='median': must be one of",
    ),
    "unknown_evaluator": (["--config.eval.evaluators=nope"], r"config\.eval\.evaluators: unknown evaluator 'nope'"),
    "unknown_source": (["--config.data.sources=nope"], r"config\.data\.sources: unknown dataset 'nope'"),
    "unknown_optimizer": (
        ["--config.train.optimizer.name=lion"],
        r"config\.train\.optimizer\.name='lion': must be one of",
    ),
    "unknown_schedule": (
        ["--config.train.optimizer.schedule=step"],
        r"config\.train\.optimizer\.schedule='step': must be one of",
    ),
    "warmup_ratio_above_one": (
        ["--config.train.optimizer.warmup_ratio=1.5"],
        r"config\.train\.optimizer\.warmup_ratio=1\.5: must be in \[0, 1\)",
    ),
    "negative_top_k": (["--config.eval.top_k=-1"], r"config\.eval\.top_k=-1: must be an integer >= 0"),
    "no_new_tokens": (["--config.eval.max_new_tokens=0"], r"config\.eval\.max_new_tokens=0: must be an integer >= 1"),
    "zero_desirable_fraction": (
        ["--config.data.desirable_fraction=0"],
        r"config\.data\.desirable_fraction=0\.0: must be in \(0, 1\]",
    ),
    "negative_desirable_weight": (
        ["--config.loss.desirable_weight=-1"],
        r"config\.loss\.desirable_weight=-1\.0: must be > 0",
    ),
    "unknown_init_scheme": (
        ["--config.init.source=s3://bucket/run"],
        r"config\.init\.source='s3://bucket/run': use ''",
    ),
    "zero_microbatches": (
        ["--config.train.num_microbatches=0"],
        r"config\.train\.num_microbatches=0: must be an integer >= 1",
    ),
    "unknown_remat_policy": (
        ["--config.model.remat_policy=sometimes"],
        r"config\.model\.remat_policy='sometimes': must be one of",
    ),
    "api_judge_without_scheme": (
        ["--config.eval.judge=api", "--config.eval.api.model=m", "--config.eval.api.base_url=localhost:8000"],
        r"config\.eval\.api\.base_url='localhost:8000'",
    ),
    "flag_of_the_wrong_type": (["--config.train.steps=abc"], r"config\.train\.steps"),
    "extra_positional_argument": (["extra"], r"unexpected arguments: \['extra'\]"),
}


def _args(case, workdir, data_dir):
    spec, _ = CASES[case]
    if isinstance(spec, dict):
        config = spec.get("config", f"{H.TINY}:{spec.get('arg', '')}")
        return ["-m", "kto_jax.train", "--config", config, "--workdir", workdir, *H.run_flags(data_dir)]
    return H.train_args(workdir, data_dir, extra=tuple(spec))


def _launch(root, case, where, reference):
    folder = os.path.join(root, f"{case}-{where}")
    os.makedirs(folder)
    workdir = os.path.join(folder, "run")
    if where == "finished":
        H.copy_run(reference["workdir"], workdir)
    before = H.snapshot(workdir) if where == "finished" else None
    result = H.Proc(_args(case, workdir, reference["data_dir"]), folder, "cli").result()
    after = H.snapshot(workdir) if os.path.exists(workdir) else None
    return {**result, "before": before, "after": after}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data_dir):
    return H.reference_run(tmp_path_factory, synthetic_data_dir)


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory, reference):
    root = str(tmp_path_factory.mktemp("record_cli"))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
    futures = {
        (case, where): pool.submit(_launch, root, case, where, reference)
        for case in CASES
        for where in ("fresh", "finished")
    }
    yield futures
    pool.shutdown(wait=True)


@pytest.mark.parametrize("where", ["fresh", "finished"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_cli_input_is_one_line_and_touches_nothing(case, where, cli_cases):
    result = cli_cases[case, where].result()
    output = result["stderr"] + result["stdout"]
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert result["rc"] == 2, f"rc {result['rc']}:\n{tail(output)}"
    assert "Traceback" not in output, tail(output)
    assert len(errors) == 1, f"{len(errors)} error lines:\n{tail(output)}"
    assert re.search(CASES[case][1], errors[0]), errors[0]
    if where == "fresh":
        assert result["after"] is None, f"a failed start created the workdir: {sorted(result['after'] or {})}"
    else:
        diff = H.snapshot_diff(result["before"], result["after"])
        assert diff == {"removed": [], "added": [], "changed": []}, f"the failed start changed the run's files: {diff}"


def test_verbosity_one_shows_the_traceback(reference, tmp_path):
    args = H.train_args(
        str(tmp_path / "run"), reference["data_dir"], extra=("--config.train.optimizer.lr=-1", "--verbosity=1")
    )
    result = H.Proc(args, str(tmp_path), "cli").result()
    assert result["rc"] != 0 and "Traceback" in result["stderr"] and "InputError" in result["stderr"], tail(
        result["stderr"]
    )


# ---------------------------------------------------------------- rerunning a finished run


def _rerun(reference, tmp_path, *extra):
    workdir = H.copy_run(reference["workdir"], str(tmp_path / "run"))
    before = H.snapshot(workdir)
    result = H.Proc(H.train_args(workdir, reference["data_dir"], extra=extra), str(tmp_path), "rerun").result()
    return workdir, before, result


def _changes(workdir):
    with open(os.path.join(workdir, "config_changes.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_same_config_on_a_finished_run_is_a_noop(reference, tmp_path):
    workdir, before, result = _rerun(reference, tmp_path)
    assert result["rc"] == 0, tail(result["stderr"])
    assert "already finished" in result["stdout"] + result["stderr"]
    assert H.snapshot(workdir) == before


def test_another_config_on_a_finished_run_names_each_field(reference, tmp_path):
    workdir, before, result = _rerun(reference, tmp_path, "--config.loss.beta=0.2", "--config.seed=3")
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert result["rc"] == 2 and len(errors) == 1, tail(result["stderr"])
    assert (
        "config.loss.beta: 0.1 (saved) -> 0.2 (now)" in errors[0] and "config.seed: 0 (saved) -> 3 (now)" in errors[0]
    )
    assert "--resume_with_changes" in errors[0] and "new --workdir" in errors[0]
    assert H.snapshot(workdir) == before


def test_shortening_a_finished_run_is_an_error(reference, tmp_path):
    workdir, before, result = _rerun(reference, tmp_path, "--config.train.steps=10")
    assert result["rc"] == 2, tail(result["stderr"])
    assert f"checkpoint is already at step {H.STEPS}" in result["stderr"], tail(result["stderr"])
    assert H.snapshot(workdir) == before


def test_more_steps_and_new_eval_settings_continue_and_are_recorded(reference, tmp_path):
    workdir, _, result = _rerun(
        reference, tmp_path, f"--config.train.steps={H.STEPS + 2}", "--config.train.eval_batches=2"
    )
    assert result["rc"] == 0, tail(result["stderr"])
    (row,) = _changes(workdir)
    assert row["step"] == H.STEPS and row["forced"] is False
    assert row["changes"] == [
        {"field": "train.eval_batches", "saved": 1, "new": 2},
        {"field": "train.steps", "saved": H.STEPS, "new": H.STEPS + 2},
    ]
    assert max(r["step"] for r in H.rows(workdir)) == H.STEPS + 2
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["train"]["steps"] == H.STEPS + 2  # config.json describes the run as it now is


def test_resume_with_changes_forces_and_records_them(reference, tmp_path):
    workdir, _, result = _rerun(reference, tmp_path, "--config.loss.beta=0.2", "--resume_with_changes")
    assert result["rc"] == 0, tail(result["stderr"])
    (row,) = _changes(workdir)
    assert row["forced"] is True and row["changes"] == [{"field": "loss.beta", "saved": 0.1, "new": 0.2}]


def test_a_run_without_its_config_json_is_not_resumed_blindly(reference, tmp_path):
    from kto_jax.train import record

    workdir = H.copy_run(reference["workdir"], str(tmp_path / "run"))
    os.remove(os.path.join(workdir, "config.json"))
    config = H.config_for(reference["data_dir"])
    with pytest.raises(rules.InputError, match="no config.json"):
        record.check_resume(config, workdir)
    assert isinstance(config, ml_collections.ConfigDict)


def test_a_field_added_since_the_run_was_saved_is_not_a_change_at_its_default(tmp_path):
    """A run saved before kto_jax gained a config field, rerun after: the field at its default
    is no difference (the run is finished); at another value it is one."""
    from kto_jax.train import record

    config = base_config()
    saved = json.loads(config.to_json_best_effort())
    del saved["reference"]["cache_dir"]
    (tmp_path / "checkpoints" / "4").mkdir(parents=True)
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "eval.json").write_text(json.dumps({"step": 4}))
    assert record.check_resume(config, str(tmp_path)).finished == {"step": 4}
    config.reference.cache_dir = "/shared/caches"
    resume = record.check_resume(config, str(tmp_path))
    assert resume.finished is None and resume.changes == (("reference.cache_dir", rules.ABSENT, "/shared/caches"),)
