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
ATTENTION_IMPLS = (None, "xla", "cudnn", "splash", "blocked")
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
      "llama" (Llama 1/2/3, Mistral), "gpt_neox" (Pythia), "qwen2" (Qwen2, Qwen2.5), "qwen3"
      (Qwen3 dense), "gemma2" (Gemma 2) or "gemma3" (Gemma 3 text).
    rope_type: "default", "linear" or "llama3" (with the rope_* scaling fields).
    rotary_pct: fraction of each head's dims that get RoPE (Pythia 0.25, Llama 1.0).
    attention_bias: biases on the q, k, v and o projections (Pythia; Llama/Qwen3 config.json
      ``attention_bias``); qkv_bias: biases on q, k and v only (Qwen2, whose o_proj has none).
    qk_norm: an RMSNorm over each head's q and k vectors before RoPE (Qwen3; scale ``[head_dim]``,
      eps ``norm_eps``), in ``kto_jax.models.common.Attention``.
    sliding_window: the attention window, i - j < sliding_window (None = full causal attention):
      on every layer (Mistral), or on the "sliding_attention" layers of ``layer_types``.
    layer_types: None (every layer alike) or one of "sliding_attention" / "full_attention" per
      layer (Gemma 2 alternates them; Gemma 3 has five sliding layers to one full). The layers stay
      one scanned stack: each layer's kind is scanned data, which picks its mask, its RoPE and (on
      splash) its kernel (``kto_jax.models.common.Attention``).
    rope_local_theta: the RoPE base of the "sliding_attention" layers, unscaled (Gemma 3's
      ``rope_local_base_freq``; None = the same RoPE on every layer).
    norm_unit_offset: RMSNorm scales by (1 + w), w initialised to 0, the product taken in float32
      before the cast (Gemma); False: by w, cast first (Llama).
    scale_embeddings: the embeddings are multiplied by sqrt(hidden_size), rounded to the compute
      dtype (Gemma).
    query_pre_attn_scalar: attention logits are q.k / sqrt(query_pre_attn_scalar) (Gemma; None:
      sqrt(head_dim)).
    attn_logit_softcap / final_logit_softcap: logits -> cap * tanh(logits / cap) on the attention
      logits (after the scaling, before the mask) / on the LM head's output (Gemma 2; None: off).
    param_dtype / compute_dtype: storage dtype of the params and dtype of the activations,
      each held as its canonical name ("float32", "bfloat16"); any spelling ``jnp.dtype``
      reads (``jnp.bfloat16``, ``np.float32``, ``jnp.dtype("float16")``) is accepted.
    remat_policy: a name in REMAT_POLICIES, applied to each layer.
    attention_impl: None (the default: "blocked" on a CPU backend, else XLA's choice of
      ``jax.nn.dot_product_attention``), "xla" or "cudnn" (GPU, bf16/fp16); "splash", the TPU
      Pallas kernel with segment ids (``kto_jax.models.splash``) on rows of a multiple of 128
      tokens, XLA's on other rows and when decoding with the KV cache; or "blocked", the
      block-causal attention of ``kto_jax.models.blocked`` (skips the key blocks the causal band
      rules out; self-attention, XLA's when decoding with the KV cache).
    scan_unroll: layers per iteration of the scanned layer loop (1: a loop over layers;
      ``num_layers``: straight-line code, as the AOT FLOP count needs).
    lora_rank / lora_alpha / lora_targets / lora_rslora: LoRA adapters (``kto_jax.models.lora``;
      rank 0 = none) on the projections named in lora_targets (of :data:`LORA_MODULES`): y = x W +
      scale * (x A) B with A ``[in, rank]``, B ``[rank, out]`` (zeros at init), scale = alpha / rank
      (rsLoRA: alpha / sqrt(rank)). A projection whose params hold no ``lora_a`` runs without its
      adapter: the base model is the same params less the adapters.
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
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    norm_unit_offset: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: int | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    remat_policy: str = "none"
    attention_impl: str | None = None
    scan_unroll: int = 1
    hf_model_type: str | None = None  # config.json model_type (default: the family's first)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ()
    lora_rslora: bool = False

    def __post_init__(self):
        _validate(self, [(self.architecture in FAMILY_RULES, "architecture", f"one of {sorted(FAMILY_RULES)}")])
        family = FAMILY_RULES[self.architecture]
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.layer_types is not None:
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
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
                (
                    self.attention_impl in ATTENTION_IMPLS,
                    "attention_impl",
                    "None, 'xla', 'cudnn', 'splash' or 'blocked'",
                ),
                (1 <= self.scan_unroll <= self.num_layers, "scan_unroll", f"in [1, num_layers={self.num_layers}]"),
                (self.hidden_act in ACTIVATIONS, "hidden_act", f"one of {sorted(ACTIVATIONS)}"),
                (
                    self.hf_model_type in family.hf_model_types,
                    "hf_model_type",
                    f"one of {sorted(family.hf_model_types)}",
                ),
                *_layer_checks(self),
                *_lora_checks(self),
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


LAYER_TYPES = ("sliding_attention", "full_attention")
LORA_MODULES = ("q", "k", "v", "o", "gate", "up", "down")  # the projections LoRA can adapt, by module name


def _lora_checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for the LoRA fields."""
    return [
        (isinstance(config.lora_rank, int) and config.lora_rank >= 0, "lora_rank", "an integer >= 0 (0: no LoRA)"),
        (config.lora_alpha > 0, "lora_alpha", "positive"),
        (set(config.lora_targets) <= set(LORA_MODULES), "lora_targets", f"names among {LORA_MODULES}"),
        (
            not config.lora_rank or bool(config.lora_targets),
            "lora_targets",
            "at least one projection when lora_rank > 0",
        ),
    ]


def _layer_checks(config: ModelConfig) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) for the per-layer kinds, their windows and RoPE, and the soft-caps."""
    kinds = config.layer_types
    return [
        (
            kinds is None or (len(kinds) == config.num_layers and set(kinds) <= set(LAYER_TYPES)),
            "layer_types",
            f"None or {config.num_layers} (num_layers) entries, each one of {LAYER_TYPES}",
        ),
        (
            kinds is None or "sliding_attention" not in kinds or config.sliding_window is not None,
            "sliding_window",
            "a window size: layer_types has 'sliding_attention' layers",
        ),
        (
            config.rope_local_theta is None or kinds is not None,
            "rope_local_theta",
            "None unless layer_types sets which layers are local",
        ),
        (config.sliding_window is None or config.sliding_window > 0, "sliding_window", "None or positive"),
        *(
            (getattr(config, f) is None or getattr(config, f) > 0, f, "None (off) or a positive cap")
            for f in ("attn_logit_softcap", "final_logit_softcap", "query_pre_attn_scalar")
        ),
        (
            config.attn_logit_softcap is None or config.attention_impl != "cudnn",
            "attention_impl",
            "None, 'xla' or 'splash': cuDNN's fused attention has no attention logit soft-capping "
            f"(attn_logit_softcap={config.attn_logit_softcap})",
        ),
    ]


def unset(config: ModelConfig, family: str, *fields: str) -> list[tuple[bool, str, str]]:
    """(ok, field, expected) that each of ``fields`` keeps its default: the ``family`` has no such
    layer (and its config.json could not carry it)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    return [(getattr(config, f) == defaults[f], f, f"{defaults[f]!r} ({family} has no such layer)") for f in fields]


GEMMA_FIELDS = (
    "layer_types",
    "rope_local_theta",
    "norm_unit_offset",
    "scale_embeddings",
    "query_pre_attn_scalar",
    "attn_logit_softcap",
    "final_logit_softcap",
)  # what only the Gemma families set: the other families' checks keep them at their defaults


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
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),  # Gemma's GeGLU: the tanh form
}
