"""AOT fit check: a 1B-class paper config compiled for a small TPU slice on this CPU host (libtpu)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _libtpu() -> bool:
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False
    return True


def test_pythia_1_4b_kto_compiles_and_fits_on_v5p_8():
    if not _libtpu():
        if os.environ.get("CI"):
            pytest.fail("CI installs libtpu ('.[tpu]') for this test")
        pytest.skip("libtpu not installed (pip install -e '.[tpu]')")
    proc = subprocess.run(
        [sys.executable, "scripts/aot_check.py", "--config=experiments/paper.py:model=pythia-1.4b,loss=kto",
         "--topology=v5p-8", "--config.data.max_length=1024", "--config.data.max_prompt_length=512"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout[: proc.stdout.index("\n}") + 2])
    assert report["devices"] == 4 and report["device_kind"].startswith("TPU v5")
    assert report["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    # params + RMSprop state + frozen reference, fp32, sharded over 4 chips: 3 * 1.41e9 * 4 B / 4
    assert 3.5 < report["arguments_gib"] < 4.5
    assert report["fits"] and report["total_gib"] < report["hbm_gib"] == 95.0
    # XLA's count (every loop iteration, remat recompute included) agrees with the analytic
    # model FLOPs to within what dots_no_batch recomputes and the softmax/norm/optimizer extras.
    assert 1.0 < report["xla_flops_per_chip"] / report["analytic_flops_per_chip"] < 1.1
    assert "| pythia-1.4b | kto | v5p-8 |" in proc.stdout


@pytest.mark.parametrize("remat, low, high", [("none", 1.0, 1.03), ("full", 1.12, 1.16)])
def test_xla_flop_count_sees_every_layer_and_the_remat_recompute(remat, low, high):
    """The loop-free 1- and 2-layer counts extrapolate to the fully unrolled program's count;
    full remat adds one policy forward of the three policy passes (KTO: 3 + 1 KL + 2
    reference = 6 forward-equivalents; +1 recompute ~ 7/6, less what XLA counts beyond matmuls)."""
    import jax

    from kto_jax.aot import _model_fields, lower_train_step, xla_step_flops
    from kto_jax.flops import step_flops
    from kto_jax.models.presets import get_preset
    from kto_jax.sweeps import load_config

    config = load_config("experiments/paper.py:model=pythia-1.4b,loss=kto")
    config.model.update(name="tiny-5m", remat_policy=remat)
    config.data.update(max_length=128, max_prompt_length=64)
    unrolled = get_preset("tiny-5m", **_model_fields(config), scan_unroll=5)
    lowered, spec, mode, _ = lower_train_step(config, jax.devices("cpu")[:1], unrolled, 1, 128)
    assert xla_step_flops(config) == pytest.approx(lowered.cost_analysis()["flops"], rel=1e-5)
    analytic = step_flops(get_preset("tiny-5m"), spec, batch=32, length=128, reference_mode=mode)
    assert low < xla_step_flops(config) / analytic < high


def test_unknown_topology_is_a_clear_error():
    from kto_jax.aot import topology_devices

    with pytest.raises(ValueError, match="unknown TPU topology 'v9-8'.*v5p-8"):
        topology_devices("v9-8")
