"""Test configuration: full-precision float32 matmuls; reproducible hypothesis runs in CI."""

import os

# The tests run on CPU (simulated meshes included); with libtpu installed for the AOT test,
# this keeps JAX from probing for TPU chips in every test process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from hypothesis import settings  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# CI (env CI set, and not "0"/"false"): derandomized, so every run draws the same examples and a
# failure replays exactly (derandomize implies no example database). Locally: random examples, and
# hypothesis' default database (.hypothesis/, git-ignored) keeps each failure to replay it first.
# Test modules take derandomize/database from here: their settings objects set neither.
# Both profiles derive from hypothesis' "default" profile, not from whichever is loaded now: hypothesis
# itself loads its own "ci" profile (derandomized) at import when any CI-like variable is set, CI=false
# included, and "dev" would otherwise inherit that.
IN_CI = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
_BASE = settings.get_profile("default")
settings.register_profile("ci", _BASE, derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", _BASE, deadline=None, print_blob=True)
settings.load_profile("ci" if IN_CI else "dev")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data_dir(tmp_path_factory):
    """The synthetic dataset (paired and unary), prepared once per test session."""
    from kto_jax.data.builders import prepare

    path = str(tmp_path_factory.mktemp("tfds"))
    prepare("synthetic", path)
    prepare("synthetic/unary", path)
    return path


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """Tiny random transformers checkpoints: name (tests/hf_checkpoints.py:HF_CONFIGS) -> (folder,
    in-memory transformers model), built lazily and once per session (torch imported on first use)."""
    from tests.hf_checkpoints import HF_CONFIGS, make_hf_model

    cache: dict = {}

    def get(name):
        if name not in cache:
            folder = str(tmp_path_factory.mktemp(name))
            model = make_hf_model(HF_CONFIGS[name](), seed=sorted(HF_CONFIGS).index(name))
            model.save_pretrained(folder)
            cache[name] = (folder, model)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def loaded(checkpoints):
    """name -> (folder, hf model, our model, our params)."""
    from kto_jax.models.hf import from_hf

    cache: dict = {}

    def get(name):
        if name not in cache:
            folder, hf_model = checkpoints(name)
            model, params = from_hf(folder)
            cache[name] = (folder, hf_model, model, params)
        return cache[name]

    return get


# The train-step fixtures of tests/test_train_step.py and tests/test_reference_sync.py (a module that
# defines its own fixture of the same name uses that one): the synthetic validation split, and the
# tiny-1m policy and reference params (seeds 0 and 1).
@pytest.fixture(scope="module")
def examples(synthetic_data_dir):
    from tests.test_train_step import synthetic_examples

    return synthetic_examples(synthetic_data_dir)


@pytest.fixture(scope="module")
def policy():
    from kto_jax.models.hf import init_params
    from tests.test_train_step import MODEL_CONFIG

    return init_params(MODEL_CONFIG, seed=0)


@pytest.fixture(scope="module")
def reference():
    from kto_jax.models.hf import init_params
    from tests.test_train_step import MODEL_CONFIG

    return init_params(MODEL_CONFIG, seed=1)


# The slow tier: modules that start CLIs or worker subprocesses (kill -9, multi-process, 8 simulated
# devices), load the real SmolLM2 model, compile for TPU topologies or run Pallas in its interpreter.
# `python -m pytest -m "not slow" tests` is the development loop; the README's test command runs all.
SLOW_MODULES = {
    "test_aot",
    "test_bad_input",
    "test_bench_attention",
    "test_byo_data",
    "test_checkpoint",
    "test_csft_control_tokens",
    "test_data_tokenize_real",
    "test_eval_pairwise",
    "test_faults",
    "test_init_optimizer",
    "test_judges_api",
    "test_judges_reward_model",
    "test_launch",
    "test_online",
    "test_packing_sharded",
    "test_reference_cache",
    "test_reference_sync",
    "test_results",
    "test_run_record",
    "test_serve",
    "test_sharding",
    "test_smollm2",
    "test_splash",
    "test_train_cli",
    "test_train_multiprocess",
    "test_train_precision",
    "test_train_sharded",
}


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: the slow tier (subprocesses, real models, TPU compiles); -m 'not slow' skips it"
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
