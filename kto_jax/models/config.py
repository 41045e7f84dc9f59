"""A model's configuration, ``ModelConfig``, and the names its fields take (dtypes, remat policies,
attention implementations, activations): plain data, imported by every model module and
importing none (the layers are in ``kto_jax.models.common``, the families in
``kto_jax.models.families``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from kto_jax.errors import InputError

# architecture -> its family's rules for a ModelConfig: an object with ``hf_model_types``
# (config.json model_type -> HF architectures class name; the first is the default
# ``hf_model_type``) and ``checks`` (ModelConfig -> [(ok, field, expected)]), the
# ``kto_jax.models.families.Family``. The families register here when kto_jax.models.families is
# imported, which importing any module of kto_jax.models does first (the package imports it).
FAMILY_RULES: dict[str, Any] = {}
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder-only transformer; every field maps to a Hugging Face config.json field.

    architecture: a family in ``kto_jax.models.families.FAMILIES`` (its rules: :data:`FAMILY_RULES`):
      "llama" (Llama 1/2/3, Mistral), "gpt_neox" (Pythia), "qwen2" (Qwen2, Qwen2.5) or "qwen3"
      (Qwen3 dense).
    rope_type: "default", "linear" or "llama3" (with the rope_* scaling fields).
    rotary_pct: fraction of each head's dims that get RoPE (Pythia 0.25, Llama 1.0).
    attention_bias: biases on the q, k, v and o projections (Pythia; Llama/Qwen3 config.json
      ``attention_bias``); qkv_bias: biases on q, k and v only (Qwen2, whose o_proj has none).
    qk_norm: an RMSNorm over each head's q and k vectors before RoPE (Qwen3; scale ``[head_dim]``,
      eps ``norm_eps``), in ``kto_jax.models.common.Attention``.
    sliding_window: Mistral's attention window (None = full causal attention).
    param_dtype / compute_dtype: storage dtype of the params and dtype of the activations,
      each held as its canonical name ("float32", "bfloat16"); any spelling ``jnp.dtype``
      reads (``jnp.bfloat16``, ``np.float32``, ``jnp.dtype("float16")``) is accepted.
    remat_policy: a name in REMAT_POLICIES, applied to each layer.
    attention_impl: ``jax.nn.dot_product_attention`` implementation: None (XLA's choice),
      "xla" or "cudnn" (GPU, bf16/fp16); or "splash", the TPU Pallas kernel with segment ids
      (``kto_jax.models.splash``) on rows of a multiple of 128 tokens, XLA's on other rows and
      when decoding with the KV cache.
    scan_unroll: layers per iteration of the scanned layer loop (1: a loop over layers;
      ``num_layers``: straight-line code, as the AOT FLOP count needs).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position: int = 8192
    rotary_pct: float = 1.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    use_parallel_residual: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str | None = None
    scan_unroll: int = 1
    hf_model_type: str | None = None  # config.json model_type (default: the family's first)

    def __post_init__(self):
        _validate(self, [(self.architecture in FAMILY_RULES, "architecture", f"one of {sorted(FAMILY_RULES)}")])
        family = FAMILY_RULES[self.architecture]
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.hf_model_type is None:
            object.__setattr__(self, "hf_model_type", next(iter(family.hf_model_types)))
        dtypes = {field: _dtype_name(getattr(self, field)) for field in ("param_dtype", "compute_dtype")}
        _validate(
            self,
            [
                *(
                    (name is not None, field, "a dtype name such as 'float32' or 'bfloat16'")
                    for field, name in dtypes.items()
                ),
                (self.num_heads > 0, "num_heads", "positive"),
                (
                    self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0,
                    "num_kv_heads",
                    f"a positive divisor of num_heads={self.num_heads}",
                ),
                (self.rope_type in ("default", "linear", "llama3"), "rope_type", "'default', 'linear' or 'llama3'"),
                (0 < self.rotary_pct <= 1, "rotary_pct", "in (0, 1]"),
                (self.remat_policy in REMAT_POLICIES, "remat_policy", f"one of {sorted(REMAT_POLICIES)}"),
                (self.attention_impl in ATTENTION_IMPLS, "attention_impl", "None, 'xla', 'cudnn' or 'splash'"),
                (1 <= self.scan_unroll <= self.num_layers, "scan_unroll", f"in [1, num_layers={self.num_layers}]"),
                (self.hidden_act in ACTIVATIONS, "hidden_act", f"one of {sorted(ACTIVATIONS)}"),
                (
                    self.hf_model_type in family.hf_model_types,
                    "hf_model_type",
                    f"one of {sorted(family.hf_model_types)}",
                ),
                *family.checks(self),
            ],
        )
        for field, name in dtypes.items():
            object.__setattr__(self, field, name)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _validate(config: ModelConfig, checks) -> None:
    """Raise for the first ``(ok, field, expected)`` that is not ok, naming the field and its value."""
    for ok, field, expected in checks:
        if not ok:
            raise InputError(f"ModelConfig.{field}={getattr(config, field)!r} is invalid: expected {expected}")


def _dtype_name(value) -> str | None:
    """The canonical name of a floating dtype in any spelling ``jnp.dtype`` reads ("bfloat16",
    ``jnp.bfloat16``, ``np.float32``, ``jnp.dtype("float16")``); None for anything else."""
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        return None
    return dtype.name if value is not None and jnp.issubdtype(dtype, jnp.floating) else None


ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # HF "gelu" is the exact erf form
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
}
