"""Analytic FLOPs per train step and model FLOPs utilisation (MFU).

Forward FLOPs per token follow the PaLM appendix: 2 N (N = parameters in matmuls,
the LM head included, the embedding lookup not) plus 4 L H Dh T for attention (QK^T and
AV over a context of T tokens, counted in full). A backward pass costs two forwards.
A train step is a sum of forward-equivalents over the sequences it touches, counted by the
loss's feed (``kto_jax.train.feeds``, ``forward_equivalents``) from the inputs it takes:

  unary (KTO family)  policy fwd+bwd on completions (3) + policy fwd on KL sequences (1,
                      when the loss takes KL log-probs) + reference fwd on both (1 + 1, none cached)
  paired (DPO family) policy fwd+bwd on chosen and rejected (3 + 3) + reference fwd on both (1 + 1)
  sft                 policy fwd+bwd (3)

With LoRA (``lora_rank > 0``) the base is frozen: the backward computes activation gradients but no
weight gradients, one forward-equivalent instead of two, so a policy group costs 2 (the adapters'
own FLOPs, rank << hidden, are left out). On tiny-25m KTO that is 5/6 of full training's count;
XLA's count of the compiled steps says 0.867 (rank 16 on every projection, attention included).
"""

from __future__ import annotations

import functools

from kto_jax.losses import LossSpec
from kto_jax.models import ModelConfig, param_count
from kto_jax.train.feeds import get_feed

# Dense bf16 peak FLOP/s per chip (vendor figures).
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def device_peak_flops(device_kind: str) -> float | None:
    """Peak bf16 FLOP/s of a device kind (``jax.devices()[0].device_kind``), None if unknown."""
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if name.lower() in device_kind.lower():
            return PEAK_FLOPS[name]
    return None


@functools.lru_cache(maxsize=64)
def matmul_params(config: ModelConfig) -> int:
    """Parameters that take part in matmuls: all but the embedding table (unless tied, when
    it is the LM head) and the norms."""
    total = param_count(config)
    embed = config.vocab_size * config.hidden_size
    return total if config.tie_word_embeddings else total - embed


def forward_flops_per_token(config: ModelConfig, context: int) -> float:
    attention = 4 * config.num_layers * config.num_heads * config.head_dim * context
    return 2 * matmul_params(config) + attention


def step_flops(
    config: ModelConfig,
    loss: LossSpec,
    *,
    batch: int,
    length: int,
    reference_mode: str = "model",
    hparams: dict | None = None,
) -> float:
    """Model FLOPs of one train step: ``batch`` examples (pairs for paired losses) of ``length`` tokens,
    for ``loss`` with ``hparams`` (its defaults if None); a LoRA model's backward without weight gradients."""
    backward = 1 if config.lora_rank > 0 else 2  # a frozen base: activation gradients only
    base = config.replace(lora_rank=0, lora_targets=()) if config.lora_rank > 0 else config
    per_sequence = forward_flops_per_token(base, length) * length
    mode = reference_mode if loss.needs_reference_with(hparams) else "none"
    return get_feed(loss.feed).forward_equivalents(loss.inputs(hparams), mode, backward) * batch * per_sequence
