"""Build the pieces of a run from its plan (``kto_jax.train.plan``): mesh, model and weights,
tokenizer, data and loaders. Bad config input has already failed in ``make_plan``; what
fails here is what only the files can tell (a checkpoint of another model, a tokenizer too
large for the model, an empty split), each naming the field or file and the fix.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from kto_jax import checkpoint, sharding
from kto_jax.data.builders import load_mixture
from kto_jax.data.chat import bos_id_for, get_chat_template
from kto_jax.data.feedback import Paired, paired_from_unary, sft_targets_per_prompt, unary_view, weight_warning
from kto_jax.data.loader import FeedbackLoader
from kto_jax.data.tokenize import TokenizeConfig, get_tokenizer
from kto_jax.errors import InputError, MissingInput
from kto_jax.log import note
from kto_jax.losses import get_loss
from kto_jax.models import Decoder, abstract_params, build_model, lora
from kto_jax.models.hf import init_params, load_params
from kto_jax.models.peft import load_peft
from kto_jax.models.presets import PRESETS
from kto_jax.models.vocab import grow_vocab, grown_config
from kto_jax.train import model_source as model_lookup
from kto_jax.train import trainable
from kto_jax.train.plan import Plan
from kto_jax.train.subplans import DataPlan, data_plan


def make_mesh(plan: Plan):
    """The ``(data, fsdp, tensor)`` mesh of the plan over all devices."""
    return sharding.make_mesh(plan.mesh)


def load_model(plan: Plan, mesh) -> tuple[Decoder, dict]:
    """The model and its initial weights, sharded on ``mesh``: a preset's random init or an HF
    folder's weights, or an earlier run's final weights when ``config.init.source=orbax:...``."""
    return _initial_model(plan.model_config, plan.model_path, plan.init_checkpoint, plan.seed, mesh, plan.init_adapter)


def _initial_model(config, path: str, init_checkpoint: str, seed: int, mesh, adapter: str = "") -> tuple[Decoder, dict]:
    """:func:`load_model` from its parts (a run's own, or a saved run's for :func:`load_run`). With LoRA
    (``config.lora_rank``) the base weights get their adapters: ``adapter``'s (a PEFT folder,
    ``config.init.adapter``) or fresh ones (B = 0, from ``seed``)."""
    model, params = _initial_base(config, path, init_checkpoint, seed, mesh)
    if not config.lora_rank:
        return model, params
    base, _ = lora.split_adapters(params)
    if adapter:
        loaded, params = load_peft(adapter, config.replace(lora_rank=0, lora_targets=()), base)
        mismatched = [
            f"{name}: {getattr(loaded, field)!r} (config: {getattr(config, field)!r})"
            for name, field in (
                ("rank", "lora_rank"),
                ("alpha", "lora_alpha"),
                ("targets", "lora_targets"),
                ("rslora", "lora_rslora"),
            )
            if getattr(loaded, field) != getattr(config, field)
        ]
        if mismatched:
            raise InputError(
                f"config.init.adapter={adapter!r} differs from config.model.lora in {'; '.join(mismatched)}: set "
                "config.model.lora to the adapter's"
            )
        note(f"LoRA adapters from {adapter} (rank {config.lora_rank}, {', '.join(config.lora_targets)})")
        targets = sharding.abstract_on(abstract_params(config), mesh)
        return model, jax.tree_util.tree_map(lambda x, t: jax.device_put(x, t.sharding), params, targets)
    return model, lora.init_adapters(config, base, seed, mesh)


def _initial_base(config, path: str, init_checkpoint: str, seed: int, mesh) -> tuple[Decoder, dict]:
    """The starting weights: an earlier run's, a preset's random init or an HF folder's. An earlier
    LoRA run's adapters are merged into its weights unless this run continues the same adapters."""
    if init_checkpoint:
        earlier = load_run(
            init_checkpoint,
            mesh=mesh,
            model_fields=_dtype_fields(config),
            where=f"config.init.source=orbax:{init_checkpoint}",
        )
        params, earlier_config = earlier.params, earlier.model.config
        same_lora = all(
            getattr(earlier_config, f) == getattr(config, f)
            for f in ("lora_rank", "lora_alpha", "lora_targets", "lora_rslora")
        )
        if earlier_config.lora_rank and not same_lora:  # its adapters become part of this run's base
            earlier_config, params = lora.merge_weights(earlier_config, params)
            note(f"orbax:{init_checkpoint}: its LoRA adapters merged into the weights")
        base = config.replace(lora_rank=0, lora_targets=())
        expected = checkpoint.param_shapes(nn.unbox(abstract_params(base)))
        if checkpoint.param_shapes(lora.split_adapters(params)[0]) != expected:
            raise checkpoint.IncompatibleCheckpoint(
                f"config.init.source=orbax:{init_checkpoint}: that run trained model {earlier.config.model.name!r}, "
                "whose shapes differ from config.model; set config.model.name to the same model"
            )
        note(f"initialised from orbax:{init_checkpoint} (step {earlier.step})")
        return build_model(config), params
    base = config.replace(lora_rank=0, lora_targets=())  # the base's own init, whatever LoRA adds
    if path in PRESETS:
        return build_model(config), init_params(base, seed, mesh)
    return build_model(config), load_params(base, path, mesh)


def _dtype_fields(config) -> dict:
    return {"param_dtype": config.param_dtype, "compute_dtype": config.compute_dtype}


@dataclasses.dataclass
class FinishedRun:
    """A run opened from its workdir (:func:`load_run`): what serving, export, sampling and
    ``init.source=orbax:`` need."""

    workdir: str
    step: int
    config: Any  # the saved config.json, as a ConfigDict
    model: Decoder
    params: dict  # the model params at ``step``: the checkpoint's trained leaves over the frozen ones
    tokenizer: Any
    chat_template: Any
    tokenizer_folder: str | None  # None for the byte tokenizer
    added_tokens: list  # tokens the run added to its tokenizer (CSFT's control tokens)


def read_config(workdir: str):
    """A run's saved ``config.json`` as a ConfigDict (a run from before ``config.model.dtype`` was
    named ``compute_dtype`` reads as one of today's)."""
    file = os.path.join(workdir, "config.json")
    if not os.path.exists(file):
        raise MissingInput(f"{file} not found: a kto_jax run directory (orbax:WORKDIR[@STEP]) holds config.json")
    with open(file, encoding="utf-8") as f:
        config = ml_collections.ConfigDict(json.load(f))
    if "compute_dtype" not in config.model:
        config.model.compute_dtype = config.model.dtype
    return config


def load_run(
    workdir_and_step: str, *, mesh=None, model_fields: dict | None = None, where: str = "orbax:WORKDIR[@STEP]"
) -> FinishedRun:
    """The one way to open a finished run: ``WORKDIR`` (its latest checkpoint, the final weights) or
    ``WORKDIR@STEP``. From the saved config: the model as the run built it (its init source, itself
    possibly an earlier run, then the vocabulary grown as training grew it for CSFT's control
    tokens), then the checkpoint's trained leaves over it (a frozen leaf, ``config.train.freeze``,
    is not saved: it is the init source's). ``mesh``: the params' mesh (None: the first local device);
    ``model_fields``: ModelConfig fields to override (e.g. the serving dtype); ``where``: the field or
    flag that named the run, for the errors."""
    workdir, at, step = workdir_and_step.partition("@")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    directory = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise MissingInput(f"no checkpoint in {directory!r} ({where}): is it the workdir of a finished kto_jax run?")
    config = read_config(workdir)
    fields = {**model_lookup.model_fields(config), **(model_fields or {})}
    path = model_lookup.model_source(config)
    model_config = model_lookup.run_model_config(config, path, fields)
    init = config.init.source
    init_checkpoint = os.path.expanduser(init[len("orbax:") :]) if init.startswith("orbax:") else ""
    data = data_plan(config, PRESETS)
    folder = data.tokenizer_folder
    tokenizer = get_tokenizer(folder or "bytes")
    added = tokenizer.add_tokens(get_loss(config.loss.name).control_tokens)  # as the run did (add_control_tokens)
    freeze = model_lookup.run_freeze(config)
    if freeze:  # the frozen leaves are the start's: build it as the run did
        adapter = os.path.expanduser(config.init.get("adapter", ""))
        model, params = _initial_model(model_config, path, init_checkpoint, int(config.seed), mesh, adapter)
        if tokenizer.vocab_size > model.config.vocab_size:
            grown, params = grow_vocab(model.config, params, tokenizer.vocab_size, mesh)
            model = build_model(grown)
    else:  # every leaf is in the checkpoint: restore onto abstract targets, reading nothing else
        model = build_model(grown_config(model_config, tokenizer.vocab_size))
        params = sharding.abstract_on(abstract_params(model.config), mesh)
    trained, frozen = trainable.split({"model": params}, freeze)
    restored, saved_step = checkpoint.load_params(
        workdir + (f"@{step}" if at else ""), trained.get("model", {}), where=where
    )
    params = trainable.merge({"model": restored}, frozen)["model"]
    template = chat_template(data)
    return FinishedRun(workdir, saved_step, config, model, params, tokenizer, template, folder, added)


@dataclasses.dataclass
class Data:
    examples: list
    stats: dict
    source: list = dataclasses.field(
        default_factory=list
    )  # the split's examples before the loss's view (the judged prompts)


def load_split(plan: Plan, split: str, sources: str = "") -> Data:
    """Training examples of ``split`` of ``sources`` (default ``config.data.sources``) in the view the
    loss needs (paired, unary, SFT), with counts."""
    d, spec = plan.data, plan.loss
    field = "config.data.eval_sources" if sources and sources != d.sources else "config.data.sources"
    sources = sources or d.sources
    examples, mixture = load_mixture(
        sources,
        split,
        d.data_dir,
        d.manual_dir,
        skip_bad_records=d.skip_bad_records,
        seed=d.seed,
        files=dict(d.files),
    )
    if not examples:
        raise InputError(f"{field}={sources!r} split {split!r} has no examples")
    paired, source = isinstance(examples[0], Paired), examples
    stats: dict = {"source_examples": len(examples), **mixture}
    if spec.kind == "paired":
        if not paired:  # unary feedback: a desirable and an undesirable reply of one prompt make a pair
            examples, pair_stats = paired_from_unary(examples)
            stats.update(pair_stats)
            if not examples:
                raise InputError(
                    f"loss {spec.name!r} needs paired data, but {field}={sources!r} is unary and no prompt "
                    f"of split {split!r} has both a desirable and an undesirable completion to pair "
                    f"({pair_stats['unary_prompts_unpaired']} prompts with one kind only): use a unary loss (kto, "
                    "kto_zero, ...) or a paired source"
                )
            note(
                f"{split}: {pair_stats['unary_pairs']} (desirable, undesirable) pairs from {pair_stats['unary_prompts_paired']} "
                f"prompts for {spec.name}; {pair_stats['unary_completions_unpaired']} completions unpaired "
                f"({pair_stats['unary_prompts_unpaired']} prompts with one kind only)"
            )
        return Data(examples, stats, source)
    if spec.kind == "sft":
        stats["sft_targets"] = d.sft_targets
    if spec.kind == "sft" and d.sft_targets == "per_prompt":
        # one target per unique prompt (HALOs' SFTDataLoader), all desirable: sft_examples drops none
        examples, target_stats = sft_targets_per_prompt(examples)
        stats.update(target_stats)
        if not examples:
            raise InputError(
                f"{field}={sources!r} split {split!r} has no prompt with an SFT target "
                "(config.data.sft_targets='per_prompt')"
            )
    examples, feedback_stats = unary_view(
        examples,
        seed=d.seed,
        one_y=d.one_y_per_x,
        desirable_fraction=d.desirable_fraction,
        undesirable_fraction=d.undesirable_fraction,
    )
    stats.update(dataclasses.asdict(feedback_stats))
    if spec.kind == "sft" and d.sft_examples == "desirable":
        kept = [ex for ex in examples if ex.desirable]
        stats["sft_dropped_undesirable"] = len(examples) - len(kept)
        examples = kept
    n_d = sum(ex.desirable for ex in examples)
    hparams = dict(plan.hparams)
    for key in [
        k for k in hparams if k.rsplit(".", 1)[-1] == "desirable_weight"
    ]:  # "kto.desirable_weight" in a mixture
        term = key[: -len("desirable_weight")]
        warning = weight_warning(n_d, len(examples) - n_d, hparams[key], hparams[term + "undesirable_weight"])
        if warning:
            logging.warning("%s", warning)
            stats["weight_warning"] = warning
    return Data(examples, stats, source)


def chat_template(data: DataPlan):
    """``config.data.chat_template`` as a ``kto_jax.data.chat.ChatTemplate`` (a built-in, or the tokenizer folder's own)."""
    return get_chat_template(data.chat_template, data.tokenizer_folder)


def tokenizer_for(data: DataPlan, model: Decoder, model_name: str = "the model"):
    """The run's tokenizer; its BOS is the one the chat template writes (``chat.bos_id_for``)."""
    name = data.tokenizer
    if not name:
        raise InputError(
            f"config.data.tokenizer is empty and model {model_name!r} is a preset with no tokenizer: set "
            "config.data.tokenizer='bytes' or a model folder"
        )
    tokenizer = get_tokenizer(name)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise InputError(
            f"config.data.tokenizer={name!r} has {tokenizer.vocab_size} tokens but model {model_name!r} embeds only "
            f"{model.config.vocab_size}: use the model's own tokenizer (config.data.tokenizer='' for a model folder) or a "
            f"model with vocab_size >= {tokenizer.vocab_size} (config.model.name)"
        )
    tokenizer.bos_id = bos_id_for(chat_template(data), tokenizer)
    return tokenizer


def add_control_tokens(plan: Plan, model: Decoder, params, tokenizer, mesh):
    """CSFT's control tokens (``LossSpec.control_tokens``) added to the tokenizer where it lacks
    them, and the model's vocabulary grown to hold them (``kto_jax.models.vocab.grow_vocab``), as
    HALOs adds them and resizes the embeddings. Returns ``(model, params)``; a model whose
    vocabulary already has room (Pythia's is padded past its tokenizer) is left as it is."""
    if not plan.loss.control_tokens:
        return model, params
    added = tokenizer.add_tokens(plan.loss.control_tokens)
    if tokenizer.vocab_size <= model.config.vocab_size:
        return model, params
    config, params = grow_vocab(model.config, params, tokenizer.vocab_size, mesh)
    note(
        f"added {', '.join(added)} to the tokenizer; vocabulary grown from {model.config.vocab_size} to {config.vocab_size}"
    )
    return build_model(config), params


def tokenize_config(data: DataPlan) -> TokenizeConfig:
    return TokenizeConfig(
        max_length=data.max_length,
        max_prompt_length=data.max_prompt_length,
        chat_template=chat_template(data),
        truncation_mode=data.truncation_mode,
    )


def make_loader(plan: Plan, data: Data, tokenizer, *, seed: int) -> FeedbackLoader:
    """This process's loader of ``data`` in the plan's batch layout."""
    return FeedbackLoader(
        data.examples,
        tokenizer,
        tokenize_config(plan.data),
        global_batch_size=plan.global_batch_size,
        seed=seed,
        schema=plan.loader_schema,
        num_microbatches=plan.num_microbatches,
        bucket=plan.data.bucket,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        control_tokens=plan.loss.control_tokens or None,
        packing=plan.packing,
        pack_length=plan.pack_length,
        row_multiple=int(np.lcm(plan.data_parallel, jax.process_count())),
    )
