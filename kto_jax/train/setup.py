"""Build the pieces of a run from its config: mesh, model and weights, data, loaders.

Every check that can fail on bad input runs here, before anything is compiled, with a
message that names the config field and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
from absl import logging

from kto_jax import checkpoint, sharding
from kto_jax.data.builders import load_examples
from kto_jax.data.feedback import Paired, unary_view, weight_warning
from kto_jax.data.loader import FeedbackLoader
from kto_jax.data.tokenize import TokenizeConfig, get_tokenizer
from kto_jax.losses import LossSpec, get_loss
from kto_jax.models import Decoder, abstract_params
from kto_jax.models.hf import from_hf
from kto_jax.models.presets import PRESETS

CONTROL_TOKENS = ("<|good|>", "<|bad|>")


def loss_and_hparams(config) -> tuple[LossSpec, dict]:
    """The registry entry of ``config.loss.name`` and its hyperparameters from ``config.loss``."""
    spec = get_loss(config.loss.name)
    given = {k: v for k, v in config.loss.items() if k != "name"}
    extra = set(given) - set(spec.defaults)
    if extra:
        raise ValueError(
            f"config.loss has {sorted(extra)}, which loss {spec.name!r} does not take (its hyperparameters: "
            f"{sorted(spec.defaults)}). Choose the loss in the experiment argument (e.g. experiments/tiny.py:loss="
            f"{spec.name}) so config.loss holds its hyperparameters."
        )
    if config.reference.mode not in ("model", "cached"):
        raise ValueError(f"config.reference.mode={config.reference.mode!r}: use 'model' or 'cached'")
    if spec.token_level and config.reference.mode == "cached":
        raise ValueError(f"loss {spec.name!r} needs per-token reference log-probs: set config.reference.mode='model'")
    return spec, spec.hyperparameters(given)


def validate(config, num_devices: int) -> None:
    """Every check that needs neither data, weights nor devices: the loss and its hyperparameters,
    the model, the data sources and tokenization settings, the init source, and how the global
    batch splits over microbatches and ``num_devices`` devices. Fails naming the field."""
    from kto_jax.data.builders import BUILDERS

    spec, _ = loss_and_hparams(config)
    name = config.model.name
    if name not in PRESETS and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"config.model.name={name!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
    if name in PRESETS:
        PRESETS[name].replace(dtype=config.model.dtype, param_dtype=config.model.param_dtype,
                              remat_policy=config.model.remat_policy, attention_impl=config.model.attention_impl or None)
    for source in config.data.sources.split("+"):
        if source.strip().partition("/")[0] not in BUILDERS:
            raise ValueError(f"config.data.sources: unknown dataset {source!r}; known: {', '.join(sorted(BUILDERS))}")
    TokenizeConfig(max_length=config.data.max_length, max_prompt_length=config.data.max_prompt_length,
                   chat_template=config.data.chat_template, truncation_mode=config.data.truncation_mode)
    source = config.init.source
    if source and not source.startswith(("hf:", "orbax:")):
        raise ValueError(f"config.init.source={source!r}: use '', 'hf:PATH' or 'orbax:WORKDIR[@STEP]'")
    try:
        sizes = sharding.mesh_shape({k: int(v) for k, v in config.mesh.items()}, num_devices)
    except ValueError as e:
        raise ValueError(f"config.mesh: {e}") from None
    data_ways = sizes["data"] * sizes["fsdp"]
    batch, micro = int(config.train.global_batch_size), int(config.train.num_microbatches)
    if batch % micro or (batch // micro) % data_ways:
        raise ValueError(
            f"config.train.global_batch_size={batch} with num_microbatches={micro} must split evenly over the "
            f"{data_ways} data-parallel devices: use a multiple of {data_ways * micro}"
        )
    if spec.needs_kl and batch // micro < 2:
        raise ValueError(f"loss {spec.name!r} estimates KL within each microbatch and needs at least 2 examples per "
                         f"microbatch; got {batch // micro}. Raise config.train.global_batch_size or lower num_microbatches.")


def make_mesh(config):
    mesh_shape = {k: int(v) for k, v in config.mesh.items()}
    try:
        mesh = sharding.make_mesh(mesh_shape)
    except ValueError as e:
        raise ValueError(f"config.mesh {mesh_shape}: {e}") from None
    data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    per_microbatch = config.train.global_batch_size // max(config.train.num_microbatches, 1)
    if config.train.global_batch_size % (data_ways * config.train.num_microbatches) or per_microbatch % data_ways:
        raise ValueError(
            f"config.train.global_batch_size={config.train.global_batch_size} with num_microbatches="
            f"{config.train.num_microbatches} must split evenly over the {data_ways} data-parallel devices "
            f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}): use a multiple of {data_ways * config.train.num_microbatches}"
        )
    return mesh


def model_overrides(config) -> dict:
    return dict(
        dtype=config.model.param_dtype,
        compute_dtype=config.model.dtype,
        remat_policy=config.model.remat_policy,
        attention_impl=config.model.attention_impl or None,
    )


def load_model(config, mesh) -> tuple[Decoder, dict]:
    """The model and its initial weights, sharded on ``mesh`` (``config.model`` + ``config.init``)."""
    source = config.init.source
    name = config.model.name
    if source.startswith("hf:"):
        name, source = source[3:], ""
        if not os.path.isdir(os.path.expanduser(name)):
            raise FileNotFoundError(f"config.init.source=hf:{name}: {name!r} is not a folder (a Hugging Face model folder with config.json and safetensors)")
    if name not in PRESETS and not os.path.isdir(os.path.expanduser(name)):
        raise ValueError(f"config.model.name={name!r} is neither a preset ({', '.join(PRESETS)}) nor a model folder")
    model, params = from_hf(os.path.expanduser(name) if name not in PRESETS else name, mesh=mesh, seed=config.seed, **model_overrides(config))
    if source.startswith("orbax:"):
        params, step = checkpoint.load_params(os.path.expanduser(source[6:]), params)
        logging.info("initialised from %s (step %d)", source, step)
    elif source:
        raise ValueError(f"config.init.source={source!r}: use '', 'hf:PATH' or 'orbax:WORKDIR[@STEP]'")
    return model, params


@dataclasses.dataclass
class Data:
    examples: list
    stats: dict


def load_split(config, spec: LossSpec, split: str) -> Data:
    """Training examples of ``split`` in the view the loss needs (paired, unary, SFT), with counts."""
    d = config.data
    examples = load_examples(d.sources, split, d.data_dir, d.manual_dir or None, skip_bad_records=d.skip_bad_records)
    if not examples:
        raise ValueError(f"config.data.sources={d.sources!r} split {split!r} has no examples")
    paired = isinstance(examples[0], Paired)
    stats: dict = {"source_examples": len(examples)}
    if spec.kind == "paired":
        if not paired:
            raise ValueError(
                f"loss {spec.name!r} needs paired data (chosen and rejected per prompt), but config.data.sources="
                f"{d.sources!r} is unary: use a unary loss (kto, kto_zero, ...) or a paired source"
            )
        return Data(examples, stats)
    examples, feedback_stats = unary_view(
        examples, seed=config.seed, one_y=d.one_y_per_x,
        desirable_fraction=d.desirable_fraction, undesirable_fraction=d.undesirable_fraction,
    )
    stats.update(dataclasses.asdict(feedback_stats))
    if spec.kind == "sft":
        if d.sft_examples not in ("desirable", "all"):
            raise ValueError(f"config.data.sft_examples={d.sft_examples!r}: use 'desirable' or 'all'")
        if spec.name == "csft" and d.sft_examples != "all":
            raise ValueError("loss 'csft' conditions on <|good|>/<|bad|> and needs both kinds: set config.data.sft_examples='all'")
        if d.sft_examples == "desirable":
            kept = [ex for ex in examples if ex.desirable]
            stats["sft_dropped_undesirable"] = len(examples) - len(kept)
            examples = kept
    n_d = sum(ex.desirable for ex in examples)
    if "desirable_weight" in config.loss:
        warning = weight_warning(n_d, len(examples) - n_d, config.loss.desirable_weight, config.loss.undesirable_weight)
        if warning:
            logging.warning("%s", warning)
            stats["weight_warning"] = warning
    return Data(examples, stats)


def tokenizer_for(config, model: Decoder):
    name = config.data.tokenizer or (config.model.name if config.model.name not in PRESETS else "")
    if not name:
        raise ValueError(f"config.data.tokenizer is empty and model {config.model.name!r} is a preset with no tokenizer: set config.data.tokenizer='bytes' or a model folder")
    tokenizer = get_tokenizer(os.path.expanduser(name) if name != "bytes" else name)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"config.data.tokenizer={name!r} has {tokenizer.vocab_size} tokens but model {config.model.name!r} embeds only "
            f"{model.config.vocab_size}: use the model's own tokenizer (config.data.tokenizer='' for a model folder) or a "
            f"model with vocab_size >= {tokenizer.vocab_size} (config.model.name)"
        )
    return tokenizer


def make_loader(config, spec: LossSpec, data: Data, tokenizer, *, seed: int) -> FeedbackLoader:
    d = config.data
    return FeedbackLoader(
        data.examples,
        tokenizer,
        TokenizeConfig(max_length=d.max_length, max_prompt_length=d.max_prompt_length, chat_template=d.chat_template, truncation_mode=d.truncation_mode),
        global_batch_size=config.train.global_batch_size,
        seed=seed,
        kl_pairing=spec.needs_kl,
        num_microbatches=config.train.num_microbatches,
        bucket=d.bucket,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        control_tokens=CONTROL_TOKENS if spec.name == "csft" else None,
    )


def to_global(batch: dict, mesh) -> dict:
    """Host-local numpy batch slices -> global arrays sharded over the data axes."""
    return {
        key: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, np.ndim(value)), value)
        for key, value in batch.items()
    }
