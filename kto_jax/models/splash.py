"""TPU attention through the Pallas splash attention kernel, with segment ids (``attention_impl="splash"``).

softmax(softcap(q k^T * scale) + mask) v (scale 1/sqrt(Dh) unless the model sets
``query_pre_attn_scalar``; the kernel's own logit soft-cap, Gemma 2's ``attn_logit_softcap``) with the mask never materialised: query i sees key j iff
j <= i (and i - j < sliding_window) and ``segment_ids[i] == segment_ids[j]``. Packed rows pass
their segment ids (1, 2, ... per sequence, 0 on padding); padded rows pass the attention mask
(1 on real tokens, 0 on padding), so a real token sees exactly the real tokens before it, as
``kto_jax.models.positions.attention_mask_4d`` says; a padding query sees the padding before it
(its output is never scored). The kernel skips key blocks that the causal mask rules out,
so a packed 2048-token row costs about half the dense attention.

The kernel works on one example's ``[heads, T, Dh]``: it is vmapped over the batch and, on a
mesh, run per shard under ``jax.shard_map`` with the batch over the data axes and the heads
over ``tensor`` (the logical rules of ``kto_jax.sharding``), as MaxText does. On TPU it is the
Mosaic kernel; on CPU it runs in Pallas's interpreter (slow: for tests); on GPU it is an error
(use ``attention_impl="cudnn"``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kto_jax.errors import InputError

BLOCK_SIZES = (512, 256, 128)  # the largest that divides the row length (MaxText's sa_block_* default 512)


def block_size(length: int) -> int:
    """The kernel's q/kv block: the largest of BLOCK_SIZES dividing ``length`` (rows are padded to it)."""
    for block in BLOCK_SIZES:
        if length % block == 0:
            return block
    raise InputError(
        f"attention_impl='splash' needs rows whose length is a multiple of {BLOCK_SIZES[-1]} tokens; this row has "
        f"{length}: set data.pack_length (packed rows) or data.bucket (padded rows) to a multiple of {BLOCK_SIZES[-1]}, "
        "or use model.attention_impl='' (XLA)"
    )


def _platform(mesh) -> str:
    """The platform the program is compiled for: the context mesh's devices (an AOT mesh of TPU
    topology devices says ``tpu`` on a CPU host), else the default backend."""
    device = getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def _kernel(heads: int, length: int, sliding_window: int | None, softcap: float | None, interpret: bool):
    """The splash kernel for ``heads`` query heads on rows of ``length`` tokens (built in each trace:
    its block tables become constants of that program)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    shape = (length, length)
    if sliding_window is None:
        mask = sm.CausalMask(shape)
    else:  # i - sliding_window < j <= i
        mask = sm.LocalMask(shape, window_size=(sliding_window - 1, 0), offset=0)
    b = block_size(length)
    blocks = sk.BlockSizes(
        block_q=b,
        block_kv=b,
        block_kv_compute=b,
        block_q_dkv=b,
        block_kv_dkv=b,
        block_kv_dkv_compute=b,
        block_q_dq=b,
        block_kv_dq=b,
    )
    return sk.make_splash_mha(
        sm.MultiHeadMask([mask] * heads),
        block_sizes=blocks,
        attn_logits_soft_cap=softcap,
        head_shards=1,
        q_seq_shards=1,
        interpret=interpret,
    )


def _local_attention(q, k, v, segment_ids, sliding_window, scale, softcap, interpret):
    """One shard: q ``[B, T, H, Dh]``, k/v ``[B, T, KV, Dh]`` (H a multiple of KV), segment ids ``[B, T]``."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    _, length, heads, head_dim = q.shape
    kernel = _kernel(heads, length, sliding_window, softcap, interpret)
    scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    q = q * jnp.asarray(scale, q.dtype)  # the kernel takes q pre-scaled (the cap applies after)
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    segment_ids = segment_ids.astype(jnp.int32)
    out = jax.vmap(lambda a, b, c, s: kernel(a, b, c, segment_ids=sk.SegmentIds(q=s, kv=s)))(qh, kh, vh, segment_ids)
    return out.transpose(0, 2, 1, 3)


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array,
    sliding_window: int | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal attention within segments: q ``[B, T, H, Dh]``, k/v ``[B, T, KV, Dh]`` -> ``[B, T, H, Dh]``;
    logits ``softcap(q.k * scale)`` (scale default 1/sqrt(Dh); softcap None: off).

    Under a mesh (``kto_jax.sharding.activation_rules``) each shard of the batch and the heads
    runs the kernel on its own rows; the output keeps q's sharding.
    """
    mesh = jax.sharding.get_abstract_mesh()
    platform = _platform(mesh)
    if platform in ("gpu", "cuda"):
        raise InputError(
            "model.attention_impl='splash' is the TPU Pallas kernel; on GPU use "
            "--config.model.attention_impl=cudnn (or '' for XLA)"
        )
    block_size(q.shape[1])  # a clear error before the kernel's own
    local = functools.partial(
        _local_attention, sliding_window=sliding_window, scale=scale, softcap=softcap, interpret=platform != "tpu"
    )
    if mesh.empty:
        return local(q, k, v, segment_ids)
    q_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_heads", None))
    kv_spec = nn.logical_to_mesh_axes(("activation_batch", "activation_length", "activation_kv_heads", None))
    segment_spec = jax.sharding.PartitionSpec(q_spec[0], q_spec[1])
    return jax.shard_map(
        local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec, check_vma=False
    )(q, k, v, segment_ids)
