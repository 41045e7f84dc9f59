"""Weights & Biases tracking (config.logging.wandb, kto_jax/train/tracking.py), offline.

What wandb holds is read back from its own files: each process's ``.wandb`` transaction log,
framed as a LevelDB log with a crc32 per record (a misread record fails its checksum) and
decoded as ``wandb.proto.wandb_internal_pb2.Record`` (``tracking.read_records``); the 30-step
run's file is over one 32 KiB block, so records split across blocks are read too.

* the CLI's 30-step tiny run (tests/ckpt_helpers.py's command, a row every step, held-out rows
  every 10 steps): the history is metrics.jsonl, step by step, value by value; the run record
  holds config.json and the tags, the summary eval.json's numbers;
* kill -9 past a checkpoint, then resume: the same run id, each step once in the union of the
  two processes' histories; the dead process's steps after the checkpoint keep its values
  (its metrics.jsonl rows, timing included), equal to the resumed run's timing aside;
* in-process: a resume after wandb lost the tail that metrics.jsonl has logs the missing rows
  first and drops steps it already holds; a torn file reads as its prefix; errors and rules.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time

import pytest

from kto_jax.config import base_config
from kto_jax.errors import InputError
from kto_jax.train import rules, tracking
from tests import ckpt_helpers as H
from tests.train_helpers import tail

STEPS = H.STEPS
EVERY = 8  # checkpoint interval of the kill run
WANDB_FLAGS = (
    "--config.logging.wandb.enabled=True",
    "--config.logging.wandb.mode=offline",
    "--config.logging.wandb.tags=test,tiny",
    "--config.train.eval_every=10",
)


def wandb_env(home: str, **extra: str) -> dict:
    """proc_env() with wandb offline and its settings and caches under ``home``."""
    env = H.proc_env()
    env.update(
        WANDB_MODE="offline",
        WANDB_CONFIG_DIR=os.path.join(home, "config"),
        WANDB_CACHE_DIR=os.path.join(home, "cache"),
        WANDB_DATA_DIR=os.path.join(home, "data"),
        **extra,
    )
    return env


def by_step(rows: list[dict]) -> dict[int, dict]:
    """metrics.jsonl rows merged per step (a step's training and held-out rows are one history row)."""
    out: dict[int, dict] = {}
    for row in rows:
        out.setdefault(row["step"], {}).update({k: v for k, v in row.items() if k != "step"})
    return out


def segment_history(path: str) -> list[tuple[int, dict]]:
    """``[(step, metrics)]`` of one .wandb file, wandb's own ``_`` keys aside."""
    return [(r["_step"], {k: v for k, v in r.items() if not k.startswith("_")}) for r in tracking.history(path)]


def run_record(path: str):
    return next(r.run for r in tracking.read_records(path) if r.WhichOneof("record_type") == "run")


def summary(path: str) -> dict:
    out = {}
    for record in tracking.read_records(path):
        if record.WhichOneof("record_type") == "summary":
            out.update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in record.summary.update})
    return out


def assert_rows_equal(got: dict, expected: dict, what: str) -> None:
    assert got.keys() == expected.keys(), f"{what}: keys {sorted(got)} != {sorted(expected)}"
    diff = {k: (got[k], expected[k]) for k in expected if got[k] != expected[k]}
    assert not diff, f"{what}: values differ (wandb, metrics.jsonl): {diff}"


def fresh_run(root: str, data: str) -> dict:
    workdir = os.path.join(root, "fresh")
    proc = H.Proc(H.train_args(workdir, data, extra=WANDB_FLAGS), root, "fresh", env=wandb_env(root))
    result = proc.result()
    assert result["rc"] == 0, f"the wandb run failed:\n{tail(result['stderr'])}"
    return {"workdir": workdir}


def killed_run(root: str, data: str) -> dict:
    """Kill -9 once the dead process's .wandb file holds steps past its latest checkpoint, resume."""
    workdir = os.path.join(root, "killed")
    # a flush every 0.05 s (wandb's default is 15 s), so the file has the dead process's steps
    env = wandb_env(root, WANDB__TRANSACTION_LOG_FLUSH_INTERVAL="0.05")
    args = H.train_args(workdir, data, extra=WANDB_FLAGS, every=EVERY)
    proc = H.Proc(args, root, "killed", env=env)

    def past_checkpoint():
        if not os.path.exists(os.path.join(workdir, tracking.RUN_ID_FILE)):
            return None
        files = tracking.segments(workdir, tracking.run_id(workdir))
        steps = [s for s, _ in segment_history(files[0])] if files else []
        p = max(steps, default=0)
        return p >= EVERY + 2 and 2 <= p % EVERY <= 4 and max(H.ckpt_steps(workdir), default=0) == p - p % EVERY

    H.wait_for(proc, past_checkpoint, "a flushed step past a checkpoint")
    proc.kill_group(signal.SIGKILL)
    proc.popen.wait()
    before = {"rows": H.rows(workdir), "checkpoint": max(H.ckpt_steps(workdir))}
    time.sleep(0.2)  # the orphaned wandb-core notices its parent died and exits
    resumed = H.Proc(args, root, "resumed", env=env).result()
    assert resumed["rc"] == 0, f"the resumed wandb run failed:\n{tail(resumed['stderr'])}"
    return {"workdir": workdir, **before}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_data_dir):
    pytest.importorskip("wandb")
    root = str(tmp_path_factory.mktemp("wandb"))
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        fresh = pool.submit(fresh_run, root, synthetic_data_dir)
        killed = pool.submit(killed_run, root, synthetic_data_dir)
        return {"fresh": fresh.result(), "killed": killed.result()}


@pytest.mark.slow
def test_offline_run_history_is_metrics_jsonl(runs):
    workdir = runs["fresh"]["workdir"]
    rid = tracking.run_id(workdir)
    files = tracking.segments(workdir, rid)
    assert len(files) == 1 and files[0].endswith(f"-{rid}/run-{rid}.wandb"), files
    assert os.path.getsize(files[0]) > 32768, "the run's file should span blocks (records split across them)"
    expected = by_step(H.rows(workdir))
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert all(s in expected and "eval/loss" in expected[s] for s in (10, 20, STEPS)), "held-out rows expected"
    history = segment_history(files[0])
    assert [s for s, _ in history] == sorted(expected), "one history row per metrics.jsonl step, in order"
    for step, row in history:
        assert_rows_equal(row, expected[step], f"step {step}")

    record = run_record(files[0])
    assert record.run_id == rid and list(record.tags) == ["test", "tiny"]
    config = {u.key: json.loads(u.value_json) for u in record.config.update if u.key != "_wandb"}
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert config == json.load(f)
    with open(os.path.join(workdir, "eval.json"), encoding="utf-8") as f:
        results = json.load(f)
    final = summary(files[0])
    assert results["held_out"], results
    for key, value in results["held_out"].items():
        assert final[f"held_out/{key}"] == value, key
    assert final["step"] == results["step"] == STEPS


@pytest.mark.slow
def test_kill_and_resume_continue_the_run_with_each_step_once(runs):
    workdir, c, dead_rows = runs["killed"]["workdir"], runs["killed"]["checkpoint"], runs["killed"]["rows"]
    rid = tracking.run_id(workdir)
    files = tracking.segments(workdir, rid)
    assert len(files) == 2, f"one .wandb file per process, both of run {rid}: {files}"
    assert [run_record(f).run_id for f in files] == [rid, rid]
    dead, resumed = segment_history(files[0]), segment_history(files[1])
    p = dead[-1][0]
    assert c < p, f"the dead process's file should hold steps past checkpoint {c} (it ends at {p})"
    steps = [s for s, _ in dead + resumed]
    assert steps == list(range(1, STEPS + 1)), f"each step once, in order: {steps}"

    final, before_kill = by_step(H.rows(workdir)), by_step(dead_rows)
    assert sorted(final) == steps
    for step, row in dead + resumed:
        if c < step <= p:  # logged by the dead process, trained again after the resume
            assert_rows_equal(row, before_kill[step], f"step {step} (the dead process's row)")
            comparable = {k: v for k, v in row.items() if k not in H.TIMING}
            assert_rows_equal(comparable, {k: v for k, v in final[step].items() if k not in H.TIMING}, f"step {step}")
        else:
            assert_rows_equal(row, final[step], f"step {step}")


def offline_config():
    config = base_config()
    config.logging.wandb.update(dict(enabled=True, mode="offline", project="kto-jax-test"))
    return config


def write_rows(workdir: str, rows: list[dict]) -> None:
    with open(os.path.join(workdir, "metrics.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_resume_logs_the_rows_wandb_lost_and_skips_those_it_holds(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for name in ("CONFIG", "CACHE", "DATA"):
        monkeypatch.setenv(f"WANDB_{name}_DIR", str(tmp_path / name.lower()))
    monkeypatch.setenv("WANDB_MODE", "offline")
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    rows = [{"step": s, "loss": s / 10, "tokens": 100 + s} for s in range(1, 9)]
    rows.insert(4, {"step": 4, "eval/loss": 0.25})
    config = offline_config()

    write_rows(workdir, rows[:3])  # the first process: steps 1..3 reach wandb
    first = tracking.WandbTracker.open(config, workdir)
    assert first.floor == -1
    first.close()
    write_rows(workdir, rows[:7])  # it also wrote 4..6 to metrics.jsonl, then died; checkpoint 6
    rid = tracking.run_id(workdir)
    # right after finish() the file has been read without its history (about once in 20 runs here);
    # a resumed process starts seconds after the one before it, so wait as long for it in this one
    deadline = time.monotonic() + 10
    while tracking.last_local_step(workdir, rid) != 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    second = tracking.WandbTracker.open(config, workdir)  # logs 4..6 (and 4's held-out row) first
    assert second.floor == 3, [segment_history(f) for f in tracking.segments(workdir, rid)]
    second.log(2, {"loss": -1.0})  # already in the run: dropped
    for row in rows[7:]:
        second.log(row["step"], row)
    second.close({"step": 8, "held_out": {"eval/loss": 0.5}})

    rid = tracking.run_id(workdir)
    files = tracking.segments(workdir, rid)
    assert len(files) == 2 and all(run_record(f).run_id == rid for f in files)
    history = [h for f in files for h in segment_history(f)]
    expected = by_step(rows)
    assert [s for s, _ in history] == list(range(1, 9))
    for step, row in history:
        assert_rows_equal(row, expected[step], f"step {step}")
    assert summary(files[1])["held_out/eval/loss"] == 0.5

    torn = str(tmp_path / "torn.wandb")  # a process killed mid-write: the records before the tear
    with open(files[1], "rb") as f:
        data = f.read()
    with open(torn, "wb") as f:
        f.write(data[: len(data) * 2 // 3])
    full, cut = tracking.history(files[1]), tracking.history(torn)
    assert cut == full[: len(cut)] and len(cut) < len(full)


def test_wandb_asked_for_but_not_installed_names_the_field_and_the_install(monkeypatch):
    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    tracking.check_available(base_config())  # off: nothing asked
    with pytest.raises(InputError, match=r"config\.logging\.wandb\.enabled=True.*pip install -e '\.\[wandb\]'"):
        tracking.check_available(offline_config())


def test_run_id_is_kept_and_a_bad_one_is_an_error(tmp_path):
    rid = tracking.run_id(str(tmp_path))
    assert rid.isalnum() and len(rid) == 8 and tracking.run_id(str(tmp_path)) == rid
    (tmp_path / tracking.RUN_ID_FILE).write_text("not an id!\n")
    with pytest.raises(InputError, match="wandb_run_id holds 'not an id!'.*delete the file"):
        tracking.run_id(str(tmp_path))


def test_logging_rules_and_resume():
    config = base_config().to_dict()  # values of the wrong type, as a config file could hold
    config["logging"]["wandb"].update(enabled="yes", mode="cloud", project="")
    found = "\n".join(rules.problems(config))
    for field in ("enabled='yes'", "mode='cloud'", "project=''"):
        assert f"config.logging.wandb.{field}" in found, found
    assert not rules.problems(offline_config())
    assert rules.resumable("logging.wandb.enabled") and rules.resumable("logging.wandb.project")


def test_summary_and_rows_are_the_numbers():
    assert tracking.flat_numbers({"step": 3, "judged": {"rate": 0.5, "ci": [0.1, 0.9], "n": {"k": 2}}}) == {
        "step": 3,
        "judged/rate": 0.5,
        "judged/n/k": 2,
    }
    assert tracking.numbers({"step": 1, "loss": 0.5, "hist": [1, 2], "ok": True}) == {"loss": 0.5, "ok": True}
