"""What the decoders share: attention and the scanned decoder stack (the config:
``kto_jax.models.config``; positions, masks and RoPE: ``kto_jax.models.positions``).

Param and activation shapes carry logical axis names (see ``kto_jax.sharding``):
``embed``, ``mlp``, ``heads``, ``kv_heads``, ``head_dim``, ``vocab``, ``norm``, and
``layers`` for the stacked (scanned) layer axis.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.models.blocked import blocked_attention
from kto_jax.models.config import REMAT_POLICIES, ModelConfig
from kto_jax.models.positions import (
    apply_rope,
    attention_mask_4d,
    cache_attention_mask,
    positions_from_mask,
    positions_from_segments,
    rope_inv_freq,
    segment_attention_mask,
)
from kto_jax.models.splash import BLOCK_SIZES as SPLASH_BLOCKS
from kto_jax.models.splash import splash_attention


def init(config: ModelConfig, axes: tuple[str, ...]):
    """Normal(initializer_range) init carrying logical axis names."""
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), axes)


def zeros(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones(axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def lora_delta(module: nn.Module, x, in_dims: tuple, in_axes: tuple, out_dims: tuple, out_axes: tuple):
    """LoRA's update of one projection, ``scale * (x A) B`` (None when the module has no adapter).

    A ``[*in_dims, rank]`` ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming-uniform default),
    B ``[rank, *out_dims]`` = 0, scale = lora_alpha / rank (rsLoRA: / sqrt(rank)); x's last
    ``len(in_dims)`` axes are contracted. A module gets its adapter when its name is in
    config.lora_targets and either the params are being created or they hold its ``lora_a``:
    applied to the params less the adapters, the same model is the base model.
    """
    cfg = module.config
    if not cfg.lora_rank or module.name not in cfg.lora_targets:
        return None
    if not (module.is_initializing() or module.has_variable("params", "lora_a")):
        return None
    rank, fan_in = cfg.lora_rank, int(np.prod(in_dims))
    bound = 1.0 / np.sqrt(fan_in)

    def uniform(key, shape, dtype):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    a = module.param(
        "lora_a", nn.with_logical_partitioning(uniform, (*in_axes, "lora_rank")), (*in_dims, rank), cfg.param_dtype
    )
    b = module.param("lora_b", zeros(("lora_rank", *out_axes)), (rank, *out_dims), cfg.param_dtype)
    scale = cfg.lora_alpha / (np.sqrt(rank) if cfg.lora_rslora else rank)
    cd = cfg.compute_dtype
    xa = jnp.tensordot(x.astype(cd), a.astype(cd), axes=len(in_dims))
    return jnp.tensordot(xa, b.astype(cd), axes=1) * jnp.asarray(scale, cd)


def constrain(x: jax.Array, axes: tuple[str, ...]) -> jax.Array:
    """Logical sharding constraint on an activation (a no-op outside ``sharding.activation_rules``)."""
    return nn.with_logical_constraint(x, axes)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale over the last axis, computed in float32 (as transformers
    does); scale ``[x.shape[-1]]`` with logical axis ``norm`` (replicated). The final and per-layer
    norms of Llama-style blocks, and the per-head q/k norms (``ModelConfig.qk_norm``).

    With ``config.norm_unit_offset`` (Gemma): y = (normed * (1 + w)) in float32, then cast, w
    initialised to 0; otherwise (Llama) y = w * normed, each cast to the compute dtype first."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        init_fn = zeros if cfg.norm_unit_offset else ones
        scale = self.param("scale", init_fn(("norm",)), (x.shape[-1],), cfg.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
        if cfg.norm_unit_offset:
            return (normed * (1.0 + scale.astype(jnp.float32))).astype(cfg.compute_dtype)
        return scale.astype(cfg.compute_dtype) * normed.astype(cfg.compute_dtype)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """cap * tanh(x / cap) (Gemma 2's attention and final logit soft-capping); x when cap is None."""
    return x if cap is None else cap * jnp.tanh(x / cap)


def attention_scale(config: ModelConfig) -> float:
    """The attention logits' scale: query_pre_attn_scalar^-1/2 (Gemma), else head_dim^-1/2."""
    return float(config.query_pre_attn_scalar or config.head_dim) ** -0.5


def blocked_impl(config: ModelConfig) -> bool:
    """Whether the model's self-attention runs :func:`kto_jax.models.blocked.blocked_attention`:
    ``attention_impl="blocked"``, or None (the default) on a CPU backend, where XLA's own attention
    computes the causally masked half of the scores (about 2x torch's SDPA at 512 tokens)."""
    return config.attention_impl == "blocked" or (config.attention_impl is None and jax.default_backend() == "cpu")


def xla_attention(q, k, v, mask, scale: float, cap: float | None) -> jax.Array:
    """softmax(softcap(q k^T * scale, cap) where mask, else -inf) v, the softmax in float32, for
    q ``[B, T, H, Dh]``, k/v ``[B, S, KV, Dh]`` and the ``[B, 1, T, S]`` mask: transformers' eager
    attention, which soft-capped attention needs (``jax.nn.dot_product_attention`` has no cap)."""
    batch, length, heads, head_dim = q.shape
    kv = k.shape[2]
    qg = q.reshape(batch, length, kv, heads // kv, head_dim)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    logits = jnp.where(mask[:, :, None], softcap(logits, cap), jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, length, heads, head_dim)


class Attention(nn.Module):
    """Multi-head / grouped-query self-attention with RoPE: biases on q/k/v/o when
    config.attention_bias, on q/k/v only when config.qkv_bias (Qwen2); with config.qk_norm
    (Qwen3, Gemma 3) each head's q and k vectors pass an RMSNorm (``q_norm``/``k_norm``, scale
    ``[head_dim]``, eps norm_eps) before RoPE. Logits are scaled by :func:`attention_scale` and
    soft-capped by config.attn_logit_softcap (Gemma 2).

    Per-layer kinds (config.layer_types): ``local`` is this layer's scanned flag (True on a
    "sliding_attention" layer), ``mask`` the pair ``(full, windowed)`` of masks (or the segment ids,
    for splash); the layer takes the windowed mask and config.rope_local_theta's RoPE when local."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, cache=None, local=None):
        """x [B, T, D] -> [B, T, D]. ``mask``: the ``[B, 1, T, S]`` bool mask (a pair of them with
        ``local``), or (splash) the ``[B, T]`` segment ids. With ``cache = {"k", "v", "index"}`` (k/v
        ``[B, S, KV, Dh]``), this step's keys/values are written at slot ``index`` and attention
        runs over the cache; returns (out, new_cache)."""
        cfg = self.config

        def proj(heads, axes, name):
            return HeadProjection(cfg, heads, axes, name=name)(x)

        q = proj(cfg.num_heads, "heads", "q")
        k = proj(cfg.num_kv_heads, "kv_heads", "k")
        v = proj(cfg.num_kv_heads, "kv_heads", "v")
        if cfg.qk_norm:  # over each head's head_dim vector, before RoPE (transformers' Qwen3Attention)
            q, k = RMSNorm(cfg, name="q_norm")(q), RMSNorm(cfg, name="k_norm")(k)
        inv_freq = rope_inv_freq(cfg)
        if local is not None and cfg.rope_local_theta is not None:
            local_freq = rope_inv_freq(cfg.replace(rope_theta=cfg.rope_local_theta, rope_type="default"))
            inv_freq = jnp.where(local, local_freq, inv_freq)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = constrain(q, ("activation_batch", "activation_length", "activation_heads", None))
        k = constrain(k, ("activation_batch", "activation_length", "activation_kv_heads", None))
        new_cache = None
        if cache is not None:
            start = (0, cache["index"], 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            new_cache = {"k": k, "v": v, "index": cache["index"]}
        scale, cap = attention_scale(cfg), cfg.attn_logit_softcap
        keys = (mask[0] if isinstance(mask, tuple) else mask).shape[-1]
        if cache is not None and keys < k.shape[1]:  # a prefill's mask covers its own slots: attend over those
            k, v = k[:, :keys], v[:, :keys]
        if not isinstance(mask, tuple) and mask.ndim == 2:  # splash: segment ids; the window is the kernel's

            def kernel(window):
                return lambda: splash_attention(q, k, v, mask, window, scale=scale, softcap=cap)

            if local is None:
                out = kernel(cfg.sliding_window)()
            else:
                out = jax.lax.cond(local, kernel(cfg.sliding_window), kernel(None))
        elif blocked_impl(cfg) and k.shape[1] == q.shape[1]:  # self-attention (training, a prefill): the causal band

            def kernel(window, layer_mask):
                return lambda: blocked_attention(q, k, v, layer_mask, scale=scale, softcap=cap, window=window)

            if local is None:
                out = kernel(cfg.sliding_window, mask)()
            else:
                out = jax.lax.cond(local, kernel(cfg.sliding_window, mask[1]), kernel(None, mask[0]))
        else:
            if local is not None:
                mask = jnp.where(local, mask[1], mask[0])
            if cap is not None:
                out = xla_attention(q, k, v, mask, scale, cap)
            else:
                impl = cfg.attention_impl if cfg.attention_impl in ("xla", "cudnn") else None
                out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation=impl)
        out = constrain(out, ("activation_batch", "activation_length", "activation_heads", None))
        return OutputProjection(cfg, name="o")(out), new_cache


class HeadProjection(nn.Module):
    """x ``[B, T, D]`` -> ``[B, T, heads, head_dim]``: kernel ``[D, heads, head_dim]`` (+ bias when
    config.attention_bias or config.qkv_bias).

    Written out (not ``nn.DenseGeneral``) so the kernel is created in its final 3-d shape and
    its logical axes apply directly, also under active sharding rules.
    """

    config: ModelConfig
    heads: int
    axis_name: str

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        shape = (x.shape[-1], self.heads, cfg.head_dim)
        kernel = self.param("kernel", init(cfg, ("embed", self.axis_name, "head_dim")), shape, cfg.param_dtype)
        y = jnp.einsum("btd,dhk->bthk", x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype))
        delta = lora_delta(self, x, shape[:1], ("embed",), shape[1:], (self.axis_name, "head_dim"))
        if delta is not None:
            y = y + delta
        if cfg.attention_bias or cfg.qkv_bias:
            bias = self.param("bias", zeros((self.axis_name, "head_dim")), shape[1:], cfg.param_dtype)
            y = y + bias.astype(cfg.compute_dtype)
        return y


class OutputProjection(nn.Module):
    """``[B, T, heads, head_dim]`` -> ``[B, T, D]``: kernel ``[heads, head_dim, D]`` (+ bias)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        shape = (x.shape[-2], x.shape[-1], cfg.hidden_size)
        kernel = self.param("kernel", init(cfg, ("heads", "head_dim", "embed")), shape, cfg.param_dtype)
        y = jnp.einsum("bthk,hkd->btd", x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype))
        delta = lora_delta(self, x, shape[:2], ("heads", "head_dim"), shape[2:], ("embed",))
        if delta is not None:
            y = y + delta
        if cfg.attention_bias:
            y = y + self.param("bias", zeros(("embed",)), (cfg.hidden_size,), cfg.param_dtype).astype(cfg.compute_dtype)
        return y


class Dense(nn.Module):
    """y = x @ kernel (+ bias) (+ its LoRA update, :func:`lora_delta`), in the compute dtype:
    ``nn.Dense``'s params and arithmetic, with logical axes on kernel and bias."""

    config: ModelConfig
    features: int
    axes: tuple[str, str]
    use_bias: bool = False

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        shape = (x.shape[-1], self.features)
        kernel = self.param("kernel", init(cfg, self.axes), shape, cfg.param_dtype)
        y = jax.lax.dot_general(
            x.astype(cfg.compute_dtype), kernel.astype(cfg.compute_dtype), (((x.ndim - 1,), (0,)), ((), ()))
        )
        if self.use_bias:
            y = y + self.param("bias", zeros(self.axes[1:]), (self.features,), cfg.param_dtype).astype(
                cfg.compute_dtype
            )
        delta = lora_delta(self, x, shape[:1], self.axes[:1], shape[1:], self.axes[1:])
        return y if delta is None else y + delta


def dense(config: ModelConfig, features: int, axes: tuple[str, str], name: str, use_bias: bool = False) -> Dense:
    """A :class:`Dense` layer with logical axes on kernel and bias."""
    return Dense(config, features, axes, use_bias, name=name)


class Decoder(nn.Module):
    """Embedding -> ``num_layers`` scanned blocks -> final norm -> LM head.

    ``model.apply({"params": params}, input_ids, attention_mask)`` gives logits
    ``[B, T, vocab]``; ``return_hidden=True`` gives the final (normed) hidden states
    ``[B, T, hidden]`` for the chunked log-prob path, with :func:`lm_head_kernel`.
    """

    config: ModelConfig
    block_cls: Any
    norm_cls: Any

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        return_hidden: bool = False,
        cache=None,
        positions=None,
        segment_ids=None,
        prefill: bool = False,
    ):
        """Training/scoring: ``(input_ids, attention_mask)`` -> logits (or hidden states).

        Packed rows: ``segment_ids`` ``[B, T]`` (1, 2, ... per sequence, 0 on padding) instead of
        the attention mask: attention stays within each segment and positions restart per segment
        (:func:`segment_attention_mask`, :func:`positions_from_segments`).

        Decoding: with ``cache`` (from :func:`init_cache`) the call writes this chunk's keys and
        values at slot ``cache["index"]``; ``attention_mask`` is then the ``[B, S]`` mask of
        valid cache slots and ``positions`` the chunk's RoPE positions. Returns
        ``(logits, new_cache)``. ``prefill=True`` says the cache is empty (index 0): the chunk's
        queries attend over its own T slots only, with the self-attention of training (blocked
        on CPU) instead of over the whole cache.
        """
        cfg = self.config
        # the splash kernel takes segment ids, not a [B, 1, T, T] mask; it runs on rows of a multiple
        # of its block (the plan makes every training row so); shorter calls (init, ...) use XLA's
        splash = cfg.attention_impl == "splash" and input_ids.shape[1] % SPLASH_BLOCKS[-1] == 0
        if segment_ids is not None:
            positions = positions_from_segments(segment_ids)
            splash_ids = segment_ids

            def make_mask(window):
                return segment_attention_mask(segment_ids, window)
        elif cache is None:
            if attention_mask is None:
                attention_mask = jnp.ones(input_ids.shape, jnp.int32)
            positions = positions_from_mask(attention_mask)
            splash_ids = attention_mask

            def make_mask(window):
                return attention_mask_4d(attention_mask, window)
        else:
            splash, splash_ids = False, None

            def make_mask(window):
                mask = cache_attention_mask(attention_mask, cache["index"], input_ids.shape[1], window)
                return mask[..., : input_ids.shape[1]] if prefill else mask  # the first T slots: this chunk

        # per-layer kinds: each layer's flag is scanned data and picks one of the two masks
        local = None if cfg.layer_types is None else jnp.asarray([t == "sliding_attention" for t in cfg.layer_types])
        if splash:
            mask = splash_ids
        elif local is None:
            mask = make_mask(cfg.sliding_window)
        else:
            mask = (make_mask(None), make_mask(cfg.sliding_window))
        embed = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=init(cfg, ("vocab", "embed")),
            name="embed",
        )
        x = embed(input_ids)
        if cfg.scale_embeddings:  # Gemma: sqrt(hidden) rounded to the compute dtype, as transformers'
            x = x * jnp.asarray(cfg.hidden_size**0.5, cfg.compute_dtype)
        x = constrain(x, ("activation_batch", "activation_length", "activation_embed"))

        block = self.block_cls
        policy = REMAT_POLICIES[cfg.remat_policy]
        if policy is not None:
            block = nn.remat(block, policy=policy, prevent_cse=False)
        layers = nn.scan(
            block,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, 0),
            length=cfg.num_layers,
            unroll=cfg.scan_unroll,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )
        layer_cache = None
        if cache is not None:
            index = jnp.broadcast_to(cache["index"], (cfg.num_layers,))
            layer_cache = {"k": cache["k"], "v": cache["v"], "index": index}
        x, new_cache = layers(cfg, name="layers")(x, positions, mask, layer_cache, local)
        x = self.norm_cls(cfg, name="final_norm")(x)
        if return_hidden:
            out = x
        elif cfg.tie_word_embeddings:
            out = embed.attend(x)
        else:
            out = dense(cfg, cfg.vocab_size, ("embed", "vocab"), "lm_head")(x)
        if not return_hidden:
            out = softcap(out, cfg.final_logit_softcap)
            out = constrain(out, ("activation_batch", "activation_length", "activation_vocab"))
        if cache is None:
            return out
        return out, {"k": new_cache["k"], "v": new_cache["v"], "index": cache["index"] + input_ids.shape[1]}


def init_cache(config: ModelConfig, batch: int, max_length: int, dtype=None) -> dict:
    """An empty KV cache: k/v ``[layers, B, max_length, kv_heads, head_dim]`` and write index 0."""
    shape = (config.num_layers, batch, max_length, config.num_kv_heads, config.head_dim)
    dtype = dtype or config.compute_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "index": jnp.zeros((), jnp.int32)}


def lm_head_kernel(config: ModelConfig, params) -> jax.Array:
    """The ``[hidden, vocab]`` LM-head kernel (the embedding transposed when tied)."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    return params["lm_head"]["kernel"]
