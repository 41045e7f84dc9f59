"""Sharding (kto_jax/sharding.py) on 8 simulated CPU devices.

jax fixes its device count when it initialises, and this pytest process already has 1
device, so the checks run in one child ``python -c`` started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``; it prints a JSON report that the tests
below assert on. Per mesh ({data:2, fsdp:2, tensor:2}, {fsdp:8}, {tensor:4, data:2}) and
model (GQA Llama, GPT-NeoX, Qwen3, Gemma 2, Gemma 3): params loaded with ``from_hf(folder, mesh=mesh)`` equal the
single-device ones and are split as the logical rules say; the jitted forward inside
``activation_rules(mesh)`` equals the single-device forward. ``init_params(config, mesh=mesh)``
is checked once (each init is a compile), and ``make_mesh``'s shapes and errors on 8
devices.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GPTNeoXConfig, LlamaConfig, Qwen3Config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = {
    "data2_fsdp2_tensor2": {"data": 2, "fsdp": 2, "tensor": 2},
    "fsdp8": {"fsdp": 8},
    "tensor4_data2": {"tensor": 4, "data": 2},
}
INIT_CASE = ("llama_gqa", "data2_fsdp2_tensor2")  # (arch, mesh) of the init_params check
TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=8,
    initializer_range=0.1,
)
HF_CONFIGS = {
    "llama_gqa": lambda: LlamaConfig(**TINY, num_key_value_heads=4),
    "gpt_neox": lambda: GPTNeoXConfig(**TINY, rotary_pct=0.25, use_parallel_residual=True),
    # per-head q/k norms (logical axis "norm": replicated), head_dim 16 != hidden 64 / 8 heads
    "qwen3": lambda: Qwen3Config(**TINY, num_key_value_heads=4, head_dim=16),
    # soft-caps, a window shorter than the rows on the sliding layer, sandwich norms
    "gemma2": lambda: Gemma2Config(
        **TINY,
        num_key_value_heads=4,
        head_dim=16,
        sliding_window=4,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=10.0,
    ),
    # q/k norms, the sliding layer's own RoPE base
    "gemma3": lambda: Gemma3TextConfig(
        **TINY,
        num_key_value_heads=4,
        head_dim=16,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        rope_local_base_freq=100.0,
    ),
}
HEAD_DIM = {"qwen3": 16, "gemma2": 16, "gemma3": 16}
KV_HEADS = {"llama_gqa": 4, "qwen3": 4, "gemma2": 4, "gemma3": 4}

CHILD = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import numpy as np
    from kto_jax import sharding
    from kto_jax.models.hf import from_hf, init_params

    folders, meshes = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    init_arch, init_mesh = sys.argv[3:5]
    keystr = jax.tree_util.keystr

    def max_diff(a, b):
        diffs = [float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
                 for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))]
        assert diffs
        return max(diffs)

    def layout(params):
        return {keystr(p): {"spec": str(x.sharding.spec), "shard_shape": list(x.sharding.shard_shape(x.shape)),
                            "shape": list(x.shape)}
                for p, x in jax.tree_util.tree_leaves_with_path(params)}

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, size=(8, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 7:] = 0  # right padding
    mask[2, :4] = 0  # left padding
    report = {"device_count": jax.device_count(), "models": {}, "make_mesh": {}}
    for arch, folder in folders.items():
        model, ref_params = from_hf(folder)
        ref_logits = jax.jit(model.apply)({"params": ref_params}, ids, mask)
        for name, shape in meshes.items():
            mesh = sharding.make_mesh(shape)
            _, params = from_hf(folder, mesh=mesh)
            r = {
                "mesh_shape": dict(mesh.shape),
                "loaded_param_diff": max_diff(params, ref_params),
                "logits_scale": float(np.std(np.asarray(ref_logits))),
                "logits_absmax": float(np.max(np.abs(np.asarray(ref_logits)))),
                "loaded": layout(params),
            }
            try:
                with sharding.activation_rules(mesh):
                    logits = jax.jit(model.apply)({"params": params}, ids, mask)
                r["logits_diff"] = max_diff(logits, ref_logits)
                r["logits_shard_shape"] = list(logits.sharding.shard_shape(logits.shape))
            except Exception as e:  # reported to the parent, which asserts on it
                r["activation_rules_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
            report["models"][f"{arch}/{name}"] = r
        if arch == init_arch:  # init_params straight onto a mesh (once: each init is a compile)
            mesh = sharding.make_mesh(meshes[init_mesh])
            init = init_params(model.config, seed=1, mesh=mesh)
            report["init"] = {
                "mesh_shape": dict(mesh.shape),
                "param_diff": max_diff(init, init_params(model.config, seed=1)),
                "layout": layout(init),
            }

    for name, shape in {"default": None, "fill": {"fsdp": -1, "tensor": 2}}.items():
        report["make_mesh"][name] = dict(sharding.make_mesh(shape).shape)
    for name, shape in {"data3": {"data": 3}, "two_fill": {"data": -1, "fsdp": -1},
                        "unknown": {"pipeline": 2}, "fill_indivisible": {"data": 3, "fsdp": -1}}.items():
        try:
            sharding.make_mesh(shape)
            report["make_mesh"][name] = "no error"
        except ValueError as e:
            report["make_mesh"][name] = "ValueError: " + str(e)
    print("REPORT " + json.dumps(report))
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folders = {}
    for i, (arch, make_config) in enumerate(HF_CONFIGS.items()):
        torch.manual_seed(i)
        model = AutoModelForCausalLM.from_config(make_config()).float()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.copy_((0.0 if name.endswith("bias") else 1.0) + 0.3 * torch.randn_like(p))
        folders[arch] = str(tmp_path_factory.mktemp(arch))
        model.save_pretrained(folders[arch])
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(folders), json.dumps(MESHES), *INIT_CASE],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, f"child failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1][len("REPORT ") :])


CASES = [(arch, mesh) for arch in HF_CONFIGS for mesh in MESHES]


def test_child_has_8_devices(report):
    assert report["device_count"] == 8


@pytest.mark.parametrize("arch, mesh", CASES)
def test_sharded_forward_equals_single_device(report, arch, mesh):
    """from_hf onto the mesh gives the single-device values, and the jitted forward inside
    activation_rules(mesh) the single-device logits, sharded batch x vocab."""
    r = report["models"][f"{arch}/{mesh}"]
    assert r["mesh_shape"] == {"data": 1, "fsdp": 1, "tensor": 1, **MESHES[mesh]}
    assert r["loaded_param_diff"] == 0.0
    assert "activation_rules_error" not in r, r.get("activation_rules_error")
    assert r["logits_scale"] > 0.3
    assert r["logits_diff"] < 1e-5
    m = r["mesh_shape"]  # logits: batch over data * fsdp, vocab over tensor
    assert r["logits_shard_shape"] == [8 // (m["data"] * m["fsdp"]), 12, 128 // m["tensor"]]


def check_layout(layout, arch, m):
    split = {k for k, v in layout.items() if v["shard_shape"] != v["shape"]}
    assert split, "every param is replicated"
    head_dim, heads_k = HEAD_DIM.get(arch, 8), KV_HEADS.get(arch, 8)
    q = layout["['layers']['attention']['q']['kernel']"]  # [layers, embed, heads, head_dim]
    assert q["shard_shape"] == [2, 64 // m["fsdp"], 8 // m["tensor"], head_dim]
    k = layout["['layers']['attention']['k']['kernel']"]
    assert k["shard_shape"] == [2, 64 // m["fsdp"], heads_k // m["tensor"], head_dim]
    if arch in ("qwen3", "gemma3"):  # [layers, head_dim], replicated as every norm
        assert layout["['layers']['attention']['q_norm']['scale']"]["shard_shape"] == [2, head_dim]
        assert layout["['layers']['attention']['k_norm']['scale']"]["shard_shape"] == [2, head_dim]
    emb = layout["['embed']['embedding']"]  # [vocab, embed]
    assert emb["shard_shape"] == [128 // m["tensor"], 64 // m["fsdp"]]
    up = layout["['layers']['mlp']['up']['kernel']"]  # [layers, embed, mlp]
    assert up["shard_shape"] == [2, 64 // m["fsdp"], 128 // m["tensor"]]
    # norms are replicated; the layer axis is never split
    assert layout["['final_norm']['scale']"]["shard_shape"] == [64]
    assert all(v["shard_shape"][0] == v["shape"][0] for k_, v in layout.items() if k_.startswith("['layers']"))


@pytest.mark.parametrize("arch, mesh", CASES)
def test_loaded_params_are_split_by_the_logical_rules(report, arch, mesh):
    r = report["models"][f"{arch}/{mesh}"]
    check_layout(r["loaded"], arch, r["mesh_shape"])


def test_init_params_on_a_mesh(report):
    arch, mesh = INIT_CASE
    r = report["init"]
    assert r["mesh_shape"] == {"data": 1, "fsdp": 1, "tensor": 1, **MESHES[mesh]}
    assert r["param_diff"] == 0.0  # the same values as a single-device init
    check_layout(r["layout"], arch, r["mesh_shape"])


def test_make_mesh_shapes(report):
    assert report["make_mesh"]["default"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert report["make_mesh"]["fill"] == {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize(
    "case, pattern",
    [
        ("data3", r"ValueError: mesh \{'data': 3, 'fsdp': 1, 'tensor': 1\} needs 3 devices; there are 8"),
        ("two_fill", r"ValueError: at most one mesh axis may be -1"),
        ("unknown", r"ValueError: mesh axes \['pipeline'\] are not known; use \('data', 'fsdp', 'tensor'\)"),
        ("fill_indivisible", r"ValueError: mesh .*8 devices are not divisible by 3"),
    ],
)
def test_make_mesh_errors(report, case, pattern):
    assert re.search(pattern, report["make_mesh"][case]), report["make_mesh"][case]
