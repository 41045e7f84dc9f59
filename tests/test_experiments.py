"""Paper and tiny experiment configs build and validate without compiling; sweeps expand."""

import importlib.util
import os

import pytest

from kto_jax.sweeps import expand, load_config, load_sweep, product, run_name, zipped
from kto_jax.train.aot import TOPOLOGIES
from kto_jax.train.plan import make_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "experiments", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PAPER = _module("paper")


def chips(topology: str) -> int:
    family, shape = TOPOLOGIES[topology]
    n = 1
    for d in shape.split("x"):
        n *= int(d)
    return n


@pytest.mark.parametrize("model", PAPER.MODELS)
def test_every_paper_config_builds_and_validates(model):
    for loss in PAPER.METHODS:
        for sft in ("false", "true"):
            config = PAPER.get_config(f"model={model},loss={loss},sft={sft}")
            make_plan(config, chips(config.target.topology))
            assert config.train.optimizer.name == "rmsprop" and config.train.optimizer.lr == 5e-7
            assert config.train.optimizer.warmup_steps == 150 and config.train.global_batch_size == 32
            assert config.data.max_length == 2048 and config.data.max_prompt_length == 1024
            assert config.model.compute_dtype == "bfloat16"
            if "beta" in config.loss:
                assert config.loss.beta == (1.0 if loss == "slic" else 0.1)
            # the published sft+csft runs start from SFT too (tests/test_experiments_published.py)
            assert config.init.source == (f"orbax:runs/paper/sft_{model}" if sft == "true" and loss != "sft" else "")


def test_paper_config_errors_name_the_argument():
    with pytest.raises(ValueError, match="unknown arguments \\['modle'\\]"):
        PAPER.get_config("modle=llama-7b")
    with pytest.raises(ValueError, match="not in the paper's suite"):
        PAPER.get_config("model=gpt2")
    with pytest.raises(ValueError, match="unknown loss 'ktoo'"):
        PAPER.get_config("model=llama-7b,loss=ktoo")


def test_make_plan_rejects_a_batch_that_does_not_split_over_devices():
    config = PAPER.get_config("model=llama-7b,loss=kto")
    with pytest.raises(ValueError, match="global_batch_size=32 .* must split evenly over the 64"):
        make_plan(config, 64)
    config.train.num_microbatches = 32
    with pytest.raises(ValueError, match="at least 2 examples per microbatch"):
        make_plan(config, 1)


def test_tiny_configs():
    tiny = _module("tiny")
    assert tiny.get_config("loss=dpo,steps=5").loss.name == "dpo"
    scale = _module("tiny_scale")
    config = scale.get_config("model=tiny-5m,loss=kto")
    assert (
        config.init.source == "orbax:runs/tiny_scale/sft_tiny-5m"
        and config.eval.baseline == "runs/tiny_scale/sft_tiny-5m"
    )
    make_plan(config, 1)
    with pytest.raises(ValueError, match="unknown arguments"):
        tiny.get_config("los=kto")


def test_sweep_products_zips_and_names(tmp_path):
    runs = product("experiments/paper.py", model=["llama-7b", "llama-13b"], loss=["kto", "dpo"])
    assert [r["config"] for r in runs][:2] == [
        "experiments/paper.py:model=llama-7b,loss=kto",
        "experiments/paper.py:model=llama-7b,loss=dpo",
    ]
    assert run_name(runs[0]) == "llama-7b_kto"
    assert len(zipped("experiments/tiny.py", loss=["kto", "dpo"], steps=[5, 6])) == 2
    with pytest.raises(ValueError, match="different lengths"):
        zipped("experiments/tiny.py", loss=["kto"], steps=[5, 6])
    with pytest.raises(ValueError, match="both named"):
        expand(runs + runs[:1])
    expanded = expand(runs, str(tmp_path))
    assert expanded[0]["workdir"] == os.path.join(str(tmp_path), "llama-7b_kto")


def test_paper_sweep_covers_the_suite():
    runs = expand(load_sweep(os.path.join(ROOT, "experiments", "sweeps", "paper.py")))
    assert len(runs) == 7 + 7 * 5 * 2
    names = {r["name"] for r in runs}
    assert {"sft_llama-30b", "llama-30b_kto_true", "pythia-1.4b_ppo_false"} <= names
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        for run in runs[::13]:
            config = load_config(run["config"])
            make_plan(config, chips(config.target.topology))
    finally:
        os.chdir(cwd)


def test_imbalance_configs_reweight_as_the_paper():
    imbalance = _module("imbalance")
    config = imbalance.get_config("desirable_fraction=0.1")
    assert config.data.desirable_fraction == 0.1 and round(config.loss.desirable_weight, 2) == 13.33
    assert config.loss.undesirable_weight == 1.0 and config.init.source == ""  # from the base model, as published
    config = imbalance.get_config("undesirable_fraction=0.1")
    assert round(config.loss.undesirable_weight, 2) == 7.5
    make_plan(config, chips(config.target.topology))
    with pytest.raises(ValueError, match="one class at a time"):
        imbalance.get_config("desirable_fraction=0.5,undesirable_fraction=0.5")


def test_zephyr_configs():
    zephyr = _module("zephyr")
    for arg in ("loss=sft", "loss=dpo", "loss=kto", "loss=kto,one_y=true"):
        config = zephyr.get_config(arg)
        make_plan(config, chips(config.target.topology))
        assert config.data.sources == "ultrafeedback" and config.model.name == "mistral-7b"
        # HALOs main (kto_jax.config.halos_main_optimizer cites the lines): AdamW, 10% warmup from 0.1 lr, cosine for SFT only
        opt = config.train.optimizer
        assert (opt.name, opt.lr, opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.grad_clip) == (
            "adamw",
            5e-6,
            0.9,
            0.999,
            1e-8,
            0.01,
            1.0,
        )
        assert (opt.warmup_ratio, opt.warmup_start_factor) == (0.1, 0.1)
        assert opt.schedule == ("cosine" if arg == "loss=sft" else "constant")
        assert (config.data.max_length, config.data.max_prompt_length, config.train.global_batch_size) == (
            1250,
            625,
            32,
        )
    assert zephyr.get_config("loss=kto,one_y=true").data.one_y_per_x
    with pytest.raises(ValueError, match="one_y=true is a KTO variant"):
        zephyr.get_config("loss=dpo,one_y=true")
