"""Checkpoints, exact resume, preemption, non-finite steps, init from a checkpoint, HF export.

The runs are the CLI, ``python -m kto_jax.train --config experiments/tiny.py:loss=kto,steps=30``
(tiny-1m from random init, batches of 8, a checkpoint every 4 steps, a metrics row every step;
tests/ckpt_helpers.py), in subprocesses started together from one module fixture so that they
overlap. Every interrupted run is compared with one uninterrupted run of the same command: every
metrics.jsonl value (training and held-out rows; timing aside) bitwise equal on CPU fp32, with the
same number of rows (no duplicates after a resume). The kill steps are random; the seed is in every
failure message (set KTO_TEST_SEED to replay).
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from tests import ckpt_helpers as H
from tests.ckpt_helpers import ckpt_dir, ckpt_steps
from tests.ckpt_scenarios import (  # noqa: E402
    SEED,
    Scenarios,
    scenario_corrupt,
    scenario_export,
    scenario_init,
    scenario_kill,
    scenario_nonfinite,
    scenario_sigterm,
)
from tests.train_helpers import tail


@pytest.fixture(scope="module")
def scenarios(tmp_path_factory, synthetic_data_dir):
    root = str(tmp_path_factory.mktemp("ckpt"))
    data = synthetic_data_dir
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=6)
    reference = pool.submit(H.reference_run, tmp_path_factory, data)
    futures = {
        "kill": pool.submit(scenario_kill, root, data),
        "sigterm": pool.submit(scenario_sigterm, root, data),
        "nonfinite": pool.submit(scenario_nonfinite, root, data, False),
        "skip": pool.submit(scenario_nonfinite, root, data, True),
        "export": pool.submit(scenario_export, root, reference),
        "garbage": pool.submit(scenario_corrupt, root, data, reference, "garbage"),
        "truncate": pool.submit(scenario_corrupt, root, data, reference, "truncate"),
        "init": pool.submit(scenario_init, root, data, reference),
    }
    yield Scenarios(futures, reference)
    pool.shutdown(wait=True)


def resumed_from(stderr: str, workdir: str) -> list[int]:
    return [int(s) for s in re.findall(rf"resumed from {re.escape(ckpt_dir(workdir))}/(\d+)", stderr)]


# ---------------------------------------------------------------- 4. resume with another model


def test_resume_with_another_model_is_a_clear_error(scenarios, tmp_path, monkeypatch):
    from kto_jax.checkpoint import IncompatibleCheckpoint
    from kto_jax.train import loop

    H.reuse_random_init(monkeypatch)
    ref = scenarios.reference
    workdir = H.copy_run(ref["workdir"], str(tmp_path / "run"))
    before = H.snapshot(ckpt_dir(workdir))
    config = H.config_for(ref["data_dir"], extra=("--config.model.name=tiny-5m",))
    with pytest.raises(IncompatibleCheckpoint) as error:  # past the config check (tests/test_run_record.py)
        loop.run(config, workdir, resume_with_changes=True)
    message = str(error.value)
    newest = f"{ckpt_dir(workdir)}/{ckpt_steps(workdir)[-1]}"
    assert newest in message and "'tiny-1m'" in message and "new --workdir" in message, message
    assert H.snapshot(ckpt_dir(workdir)) == before
    # (that the rest of the workdir, config.json included, is unchanged too: tests/test_bad_input.py)


# ---------------------------------------------------------------- 8. Checkpointer unit tests (in-process)

LOSSES = {2: 5.0, 4: 1.0, 6: 3.0, 8: 4.0, 10: 2.0}


def _save_steps(checkpointer, steps=range(1, 11)) -> list[int]:
    import jax.numpy as jnp

    saved = []
    for step in steps:
        state = {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step)}
        metrics = {"eval/loss": LOSSES[step]} if step in LOSSES else None
        if checkpointer.save(step, state, {"index": step}, {"model": "none"}, metrics=metrics):
            saved.append(step)
    checkpointer.wait()
    return saved


@pytest.mark.parametrize(
    "best_metric,best_mode,kept",
    [
        ("", "min", [8, 10]),
        ("eval/loss", "min", [4, 8, 10]),  # the best (lowest) loss, 1.0 at step 4, plus the last two
        ("eval/loss", "max", [2, 8, 10]),  # the highest, 5.0 at step 2
    ],
)
def test_keep_last_plus_best(tmp_path, best_metric, best_mode, kept):
    from kto_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), every_steps=2, keep_last=2, best_metric=best_metric, best_mode=best_mode)
    assert _save_steps(checkpointer) == [2, 4, 6, 8, 10]
    assert checkpointer.steps() == kept
    checkpointer.close()
    assert Checkpointer(str(tmp_path)).steps() == kept  # what a rerun sees


@pytest.mark.parametrize("every", [1, 3, 4])
def test_every_steps_saves_exactly_at_multiples(tmp_path, every):
    from kto_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), every_steps=every, keep_last=100)
    assert _save_steps(checkpointer) == [s for s in range(1, 11) if s % every == 0]
    checkpointer.close()


def test_no_periodic_saves_without_every_steps_but_forced_saves_happen(tmp_path):
    from kto_jax.checkpoint import Checkpointer

    checkpointer = Checkpointer(str(tmp_path), keep_last=2)
    assert _save_steps(checkpointer) == []
    assert checkpointer.save(10, {"w": np.zeros(2)}, {}, {}, force=True)
    checkpointer.close()
    assert Checkpointer(str(tmp_path)).steps() == [10]


# ---------------------------------------------------------------- 6. init from another run


def _raw_state_params(workdir: str, step: int):
    """The policy params of a checkpoint read with plain orbax (no kto_jax code)."""
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(os.path.join(ckpt_dir(workdir), str(step), "state"))["params"]["model"]


def test_init_from_orbax_workdir_and_step(scenarios, monkeypatch):
    from kto_jax import checkpoint
    from kto_jax.train import setup
    from kto_jax.train.plan import make_plan

    H.reuse_random_init(monkeypatch)
    ref = scenarios.reference
    steps = ckpt_steps(ref["workdir"])
    mesh = setup.make_mesh(make_plan(H.config_for(ref["data_dir"]), 1))
    random_init = H.random_init("tiny-1m")[1]
    loaded = {}
    for suffix, step in (("", steps[-1]), (f"@{steps[0]}", steps[0])):
        config = H.config_for(ref["data_dir"], lock=False)
        config.init.source = f"orbax:{ref['workdir']}{suffix}"
        _, params = setup.load_model(make_plan(config, 1), mesh)
        H.assert_trees_equal(params, _raw_state_params(ref["workdir"], step), f"init.source={config.init.source}")
        H.assert_trees_equal(params, checkpoint.load_params(f"{ref['workdir']}{suffix}", random_init)[0], "load_params")
        loaded[step] = checkpoint.fingerprint(params)
    assert len({*loaded.values(), checkpoint.fingerprint(random_init)}) == 3


def test_cli_init_from_orbax_step_trains_from_those_weights(scenarios):
    """The CLI run with init=orbax:WORKDIR@STEP started from (and trained against) that step's weights."""
    from kto_jax import checkpoint

    run, ref = scenarios["init"], scenarios.reference
    assert run["rc"] == 0, tail(run["stderr"])
    checkpointer = checkpoint.Checkpointer(run["workdir"])
    meta = checkpointer.restore_meta(checkpointer.steps()[-1])
    checkpointer.close()
    expected = checkpoint.fingerprint(
        checkpoint.load_params(f"{ref['workdir']}@{run['step']}", H.random_init("tiny-1m")[1])[0]
    )
    assert meta["reference"] == {"source": run["source"], "fingerprint": expected}
    assert f"initialised from {run['source']} (step {run['step']})" in run["stderr"]


def test_init_from_a_missing_step_is_a_clear_error(scenarios, monkeypatch):
    from kto_jax.train import setup
    from kto_jax.train.plan import make_plan

    H.reuse_random_init(monkeypatch)
    ref = scenarios.reference
    config = H.config_for(ref["data_dir"], lock=False)
    config.init.source = f"orbax:{ref['workdir']}@8"
    with pytest.raises(
        FileNotFoundError,
        match=rf"{re.escape(ckpt_dir(ref['workdir']))}' has no step 8; it has {ckpt_steps(ref['workdir'])}".replace(
            "[", r"\["
        ).replace("]", r"\]"),
    ):
        plan = make_plan(config, 1)
        setup.load_model(plan, setup.make_mesh(plan))


# ---------------------------------------------------------------- 5. non-finite loss


def test_nonfinite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(scenarios):
    from kto_jax import checkpoint

    run = scenarios["nonfinite"]
    assert run["rc"] not in (0, None), tail(run["stderr"])
    match = re.search(
        r"FloatingPointError: non-finite loss or gradient norm at step (\d+) \(loss (\S+), grad_norm (\S+)\); "
        r"the last good checkpoint is kept in (\S+)\. .*skip_nonfinite=True",
        run["stderr"],
    )
    assert match, tail(run["stderr"])
    step = int(match.group(1))
    assert step >= 2 and match.group(4) == ckpt_dir(run["workdir"])
    assert not (np.isfinite(float(match.group(2))) and np.isfinite(float(match.group(3))))
    assert run["steps"] and run["steps"][-1] == step - 1, run["steps"]  # every_steps=1: the step before
    assert all(r["step"] < step for r in run["rows"])
    _, like = H.random_init("tiny-1m")
    params, restored = checkpoint.load_params(run["workdir"], like)
    assert restored == step - 1
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(params))


def test_skip_nonfinite_finishes_and_counts_skipped_steps(scenarios):
    run = scenarios["skip"]
    first = run["first"]
    assert first["rc"] == 0, tail(first["stderr"])
    train = [r for r in first["rows"] if "loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["nonfinite_skipped"] == 0 and np.isfinite(train[0]["loss"])
    assert train[1]["nonfinite_skipped"] == 1 and not np.isfinite(train[1]["loss"]), train[1]
    # the same run extended to 4 steps resumes and skips on
    assert run["rc"] == 0, tail(run["stderr"])
    assert resumed_from(run["stderr"], run["workdir"]) == [2]
    train = [r for r in run["rows"] if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert train[-1]["nonfinite_skipped"] > 0, train[-1]
    assert run["steps"][-1] == 4


def test_nonfinite_skipped_counts_the_whole_run_across_a_resume(scenarios):
    run = scenarios["skip"]
    train = [r for r in run["rows"] if "loss" in r]
    assert [r["nonfinite_skipped"] for r in train] == [0, 1, 2, 3]


# ---------------------------------------------------------------- 7. export round trip

TEXTS = ["Shout hello!", "plain ASCII ~`{}|\\ 0123", "café naïve Ångström façade", "emoji 🎉👍🏽 and 中文 done"]


def test_export_logits_match_transformers(scenarios):
    import torch
    from transformers import AutoModelForCausalLM

    from kto_jax import checkpoint
    from kto_jax.data.tokenize import ByteTokenizer

    exported, ref = scenarios["export"], scenarios.reference
    latest = exported["latest"]
    assert latest["rc"] == 0, tail(latest["stderr"])
    assert f"exported step {ckpt_steps(ref['workdir'])[-1]} of {ref['workdir']}" in latest["stdout"]
    model, like = H.random_init("tiny-1m")
    params, _ = checkpoint.load_params(ref["workdir"], like)
    tok = ByteTokenizer()
    ids = [tok.encode(t) + [tok.eos_id] for t in TEXTS]
    length = max(map(len, ids))
    batch = np.asarray([i + [tok.pad_id] * (length - len(i)) for i in ids], np.int32)
    mask = np.asarray([[1] * len(i) + [0] * (length - len(i)) for i in ids], np.int32)
    ours = np.asarray(model.apply({"params": params}, batch, mask))
    hf = AutoModelForCausalLM.from_pretrained(latest["out"]).float().eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(batch, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], theirs[valid], rtol=0, atol=1e-4)


def test_export_tokenizer_encodes_like_byte_tokenizer(scenarios):
    from transformers import AutoTokenizer

    from kto_jax.data.tokenize import ByteTokenizer

    latest = scenarios["export"]["latest"]
    assert latest["rc"] == 0, tail(latest["stderr"])
    hf, ours = AutoTokenizer.from_pretrained(latest["out"]), ByteTokenizer()
    for text in TEXTS:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
        assert hf.decode(ids) == text
    for token in ByteTokenizer.SPECIALS:
        assert hf.convert_tokens_to_ids(token) == ours.special_ids[token], token
    assert (hf.eos_token_id, hf.pad_token_id) == (ours.eos_id, ours.pad_id)
    assert len(hf) == ours.vocab_size


def test_export_step_exports_that_step(scenarios):
    from kto_jax import checkpoint
    from kto_jax.models.hf import from_hf

    exported, ref = scenarios["export"], scenarios.reference
    run = exported["at_step"]
    assert run["rc"] == 0, tail(run["stderr"])
    assert f"exported step {exported['step']} of" in run["stdout"]
    _, like = H.random_init("tiny-1m")
    _, params = from_hf(run["out"])
    H.assert_trees_equal(
        params, checkpoint.load_params(f"{ref['workdir']}@{exported['step']}", like)[0], "export --step"
    )
    H.assert_trees_equal(params, _raw_state_params(ref["workdir"], exported["step"]), "export --step (raw orbax)")
    latest = checkpoint.load_params(ref["workdir"], like)[0]
    assert checkpoint.fingerprint(params) != checkpoint.fingerprint(latest)


# ---------------------------------------------------------------- 3. corrupted, truncated, half-written


@pytest.mark.parametrize("how", ["garbage", "truncate"])
def test_corrupted_newest_checkpoint_falls_back_with_a_warning(scenarios, how):
    run = scenarios[how]
    ck = ckpt_dir(run["workdir"])
    newest, previous = run["steps_before"][-1], run["steps_before"][-2]
    stderr = run["stderr"]
    assert re.search(
        rf"checkpoint {re.escape(ck)}/{newest} is unreadable \(\w+: [\s\S]*?\); falling back to the previous one",
        stderr,
    ), tail(stderr)
    assert resumed_from(stderr, run["workdir"]) == [previous], tail(stderr)


@pytest.mark.parametrize("how", ["garbage", "truncate"])
def test_corrupted_newest_checkpoint_rerun_finishes_like_uninterrupted(scenarios, how):
    run, ref = scenarios[how], scenarios.reference
    assert run["rc"] == 0, tail(run["stderr"], 5)
    H.assert_same_rows(run["rows"], ref["rows"], f"corrupted newest checkpoint ({how})")


def test_half_written_checkpoint_is_never_picked_up(scenarios, tmp_path):
    run = scenarios["truncate"]
    tmp_name = os.path.basename(run["tmp"])
    step = int(tmp_name.split(".")[0])
    # the run tried the newest finalised step, then the previous one: never the temporary folder
    assert tmp_name not in run["stderr"] and f"{ckpt_dir(run['workdir'])}/{step} " not in run["stderr"]
    assert step not in resumed_from(run["stderr"], run["workdir"])
    # and orbax lists only finalised steps
    from kto_jax.checkpoint import Checkpointer

    workdir = H.copy_run(scenarios.reference["workdir"], str(tmp_path / "run"))
    shutil.copytree(
        os.path.join(ckpt_dir(workdir), str(ckpt_steps(workdir)[-1])),
        os.path.join(ckpt_dir(workdir), f"{H.STEPS + 4}.orbax-checkpoint-tmp-1700000000000000"),
    )
    checkpointer = Checkpointer(workdir)
    assert checkpointer.steps() == ckpt_steps(workdir) == run["steps_before"]
    checkpointer.close()


# ---------------------------------------------------------------- 2. SIGTERM


def test_sigterm_saves_exits_0_and_rerun_matches_uninterrupted(scenarios):
    run, ref = scenarios["sigterm"], scenarios.reference
    first = run["first"]
    info = f"seed {SEED}, SIGTERM at step >= {first['target']}"
    assert first["rc"] == 0, f"{info}: rc {first['rc']}\n{tail(first['stderr'])}"
    match = re.search(
        r"preempted \(SIGTERM\) at step (\d+): checkpoint saved in (\S+); rerun the same command", first["stdout"]
    )
    assert match, f"{info}: no 'preempted' message in stdout:\n{tail(first['stdout'])}"
    step = int(match.group(1))
    assert first["target"] <= step < H.STEPS, info
    assert match.group(2) == ckpt_dir(run["workdir"])
    assert first["steps"][-1] == step, f"{info}: checkpoints {first['steps']} after preemption at {step}"
    assert first["last_row"] == step, f"{info}: metrics end at {first['last_row']}"
    assert resumed_from(run["final"]["stderr"], run["workdir"]) == [step], info
    assert run["final"]["rc"] == 0, tail(run["final"]["stderr"])
    H.assert_same_rows(run["rows"], ref["rows"], f"SIGTERM ({info})")


# ---------------------------------------------------------------- 1. kill -9 twice


def test_kill_9_twice_then_rerun_matches_uninterrupted(scenarios):
    run, ref = scenarios["kill"], scenarios.reference
    info = f"seed {SEED}, kills {[(s['target'], s['reached'], s['listing']) for s in run['segments']]}"
    for i, seg in enumerate(run["segments"]):
        assert seg["rc"] == -signal.SIGKILL, f"{info}: segment {i + 1} was not killed mid-run: rc {seg['rc']}"
        assert seg["last_row"] < H.STEPS, info
    # each rerun resumed from the latest finalised checkpoint left by the kill, a multiple of every_steps
    for i, (seg, stderr) in enumerate(zip(run["segments"], [run["segments"][1]["stderr"], run["final"]["stderr"]])):
        found = resumed_from(stderr, run["workdir"])
        latest = max(int(d) for d in seg["listing"] if d.isdigit())
        assert found == [latest] and latest % H.EVERY == 0 and 0 < latest <= seg["last_row"], (
            f"{info}: rerun {i + 1}: {found}"
        )
    assert run["final"]["rc"] == 0, f"{info}:\n{tail(run['final']['stderr'])}"
    H.assert_same_rows(run["rows"], ref["rows"], f"kill -9 ({info})")
