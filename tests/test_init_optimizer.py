"""config.init.optimizer (kto_jax/checkpoint.py:load_opt_state): a run that starts from an earlier
run's optimizer state, on tests/ckpt_helpers.py's session reference run (30 KTO steps)."""

from __future__ import annotations

import pytest

from kto_jax.train import record
from tests import ckpt_helpers as H


@pytest.fixture(scope="module")
def reference(tmp_path_factory, synthetic_data_dir):
    return H.reference_run(tmp_path_factory, synthetic_data_dir)


def test_init_optimizer_starts_from_an_earlier_runs_optimizer_state(reference, tmp_path):
    """init.optimizer=orbax:WORKDIR: the run's optimizer state is that checkpoint's (moments and
    the schedule's count, as HALOs main's model.from_checkpoint loads optimizer.pt and
    scheduler.pt), its own step starts at 0, and the lr it logs is the carried schedule's: past
    the warmup, where a fresh optimizer would start warming up."""
    from kto_jax import checkpoint
    from kto_jax.train import loop
    from kto_jax.train.plan import make_plan
    from kto_jax.train.state import learning_rate
    from tests.train_helpers import train_rows

    ref = reference
    last = record.checkpoint_steps(ref["workdir"])[-1]
    config = H.config_for(ref["data_dir"], "loss=kto,steps=2", lock=False)
    config.init.source = config.init.optimizer = f"orbax:{ref['workdir']}"
    prepared = loop.prepare(config, str(tmp_path / "b"))
    checkpointer = checkpoint.Checkpointer(ref["workdir"], read_only=True)
    saved, _ = checkpointer.restore_state(last, prepared.state)
    checkpointer.close()
    H.assert_trees_equal(prepared.state.opt_state, saved.opt_state, "init.optimizer")
    H.assert_trees_equal(prepared.state.params, saved.params, "init.source")
    assert int(prepared.state.step) == 0
    loop.execute(prepared)
    opt = config.train.optimizer
    assert opt.warmup_steps < last  # the carried schedule is past its warmup
    assert [r["lr"] for r in train_rows(str(tmp_path / "b"))] == pytest.approx(
        [float(learning_rate(opt, last + s)) for s in range(2)]
    )
    assert ref["rows"][0]["lr"] == pytest.approx(float(learning_rate(opt, 0)))  # a fresh optimizer warms up

    config.train.optimizer.name = "sgd"
    with pytest.raises(
        checkpoint.IncompatibleCheckpoint,
        match=r"config.init.optimizer=orbax:.*: that run's optimizer is "
        r"'adamw', this one's 'sgd' \(config.train.optimizer.name\): use the same optimizer",
    ):
        loop.prepare(config, str(tmp_path / "c"))
    config.init.optimizer = f"hf:{ref['workdir']}"
    with pytest.raises(
        ValueError, match=r"config.init.optimizer='hf:.*': use '' \(a fresh optimizer\) or 'orbax:WORKDIR\[@STEP\]'"
    ):
        make_plan(config, 1)
