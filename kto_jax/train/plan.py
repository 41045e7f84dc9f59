"""A run's config validated once into a frozen plan, before any data, weights or devices are touched.

    plan = make_plan(config, num_devices=jax.device_count())

Every check that can fail on bad config input runs here, with a message that names the
field and the fix: the loss and its hyperparameters, the reference mode, the model (a preset
or a Hugging Face folder, whose config.json alone gives the ModelConfig: no weights are
read), its dtypes, the init source, the data sources and tokenization, the mesh and how the
global batch splits over it, the optimizer, the evaluators and the judge. The mesh, model
loading, the loader, the step and the AOT check all take the plan, so none of them checks
again.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np

from kto_jax import sharding
from kto_jax.data.batch import BatchSchema
from kto_jax.data.builders import FILES, parse_sources
from kto_jax.data.chat import CHAT_TEMPLATE_NAMES, get_chat_template
from kto_jax.data.schemas import SCHEMAS, parse_columns
from kto_jax.data.tokenize import TokenizeConfig
from kto_jax.errors import InputError
from kto_jax.judges import JUDGES
from kto_jax.judges.api import ApiJudge
from kto_jax.losses import LossSpec, get_loss
from kto_jax.losses.mixture import MixtureSpec
from kto_jax.models import ModelConfig, abstract_params, build_model
from kto_jax.models.presets import PRESETS
from kto_jax.models.splash import BLOCK_SIZES
from kto_jax.train import trainable
from kto_jax.train.evaluators import EVALUATORS
from kto_jax.train.feeds import StepSpec, get_feed
from kto_jax.train.model_source import check_lora, model_fields, model_source, run_freeze, run_model_config
from kto_jax.train.rules import check_values
from kto_jax.train.subplans import (
    DataPlan,
    EvalPlan,
    LoopPlan,
    OptimizerPlan,
    data_plan,
    eval_plan,
    loop_plan,
    optimizer_plan,
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """What a run is, validated: the engine's static description (hashable, no arrays).

    model_path: a preset name (random init) or a Hugging Face folder (its weights).
    init_checkpoint: ``WORKDIR[@STEP]`` of an earlier run whose weights start this one, or "".
    init_optimizer: ``WORKDIR[@STEP]`` of an earlier run whose optimizer state starts this one, or "".
    reference_mode: "model" (frozen reference in the step), "cached" (reference log-probs
      computed once, read from the batch) or "none" (the loss takes no reference).
    steps: configured steps; 0 = one epoch (resolved with the loader, :meth:`resolve_steps`).
    """

    loss: LossSpec
    hparams: tuple[tuple[str, Any], ...]
    reference_mode: str
    model_config: ModelConfig
    model_path: str
    init_checkpoint: str
    mesh_shape: tuple[tuple[str, int], ...]
    global_batch_size: int
    num_microbatches: int
    steps: int
    chunk_size: int
    skip_nonfinite: bool
    max_length: int
    seed: int
    evaluators: tuple[str, ...]
    packing: bool = False
    init_optimizer: str = ""
    init_adapter: str = ""  # config.init.adapter: a PEFT folder, the run's initial LoRA adapters
    pack_length: int = 0  # tokens per packed row (resolved: max_length when the config says 0)
    sync_every: int = 1  # reference.mode "sync": mix the policy into the reference after every k-th step
    sync_alpha: float = 1.0  # ... with this weight (1.0: copy it)
    humanline: tuple[float, float] | None = None  # (log_epsilon_P, log_epsilon_R) token clamp, or None
    freeze: tuple[str, ...] = ()  # config.train.freeze: regexes of the frozen param paths
    ld_alpha: float = 1.0  # config.loss.ld_alpha (LD-DPO; 1.0 off)
    pair_weighting: bool = False  # config.loss.use_weighting (WPO)
    # the typed parts downstream reads (kto_jax/train/subplans.py)
    data: DataPlan | None = None
    eval: EvalPlan | None = None
    optimizer: OptimizerPlan | None = None
    loop: LoopPlan | None = None

    @property
    def mesh(self) -> dict[str, int]:
        return dict(self.mesh_shape)

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.loss.inputs(dict(self.hparams))

    @property
    def needs_reference(self) -> bool:
        return self.reference_mode != "none"

    @property
    def loader_schema(self) -> BatchSchema:
        """The batch layout the loader fills (the step's, less cached reference log-probs)."""
        return get_feed(self.loss.feed).schema(self.inputs, "none", self.packing)

    def step_spec(self, model=None) -> StepSpec:
        """The step's static spec (``model`` defaults to the plan's ModelConfig built)."""
        return StepSpec(
            model or build_model(self.model_config),
            self.loss,
            self.hparams,
            self.num_microbatches,
            self.reference_mode,
            self.chunk_size,
            self.skip_nonfinite,
            self.packing,
            sync_every=self.sync_every,
            sync_alpha=self.sync_alpha,
            humanline=self.humanline,
            freeze=self.freeze,
            ld_alpha=self.ld_alpha,
            pair_weighting=self.pair_weighting,
        )

    @property
    def data_parallel(self) -> int:
        """Devices the batch's leading axis is sharded over (the mesh's data and fsdp axes)."""
        return self.mesh.get("data", 1) * self.mesh.get("fsdp", 1)

    @property
    def row_length(self) -> int:
        """Tokens per row of a batch at its longest: max_length, or pack_length when packing."""
        return self.pack_length if self.packing else self.max_length

    @property
    def packed_rows(self) -> int | None:
        """The rows the AOT check compiles a packed batch with: the tokens of the padded worst case
        (G rows of max_length) in rows of pack_length, rounded up to divide over the microbatches and
        the data-parallel devices. With pack_length = max_length that is G rows, the most packing can
        fill; with longer rows a batch whose first-fit packing needs more compiles its own shape.
        None when not packing."""
        if not self.packing:
            return None
        step = int(np.lcm(self.num_microbatches, self.data_parallel))
        rows = -(-self.global_batch_size * self.max_length // self.pack_length)
        return -(-rows // step) * step

    def resolve_steps(self, steps_per_epoch: int) -> int:
        return self.steps or steps_per_epoch

    def replace(self, **changes) -> Plan:
        return dataclasses.replace(self, **changes)


def _loss(config) -> tuple[LossSpec, dict]:
    spec = get_loss(config.loss.name)
    given, _ = spec.split_options({k: v for k, v in config.loss.items() if k != "name"})
    keys = spec.config_hyperparameters()
    extra = set(given) - set(keys)
    if extra:
        raise InputError(
            f"config.loss has {sorted(extra)}, which loss {spec.name!r} does not take (its hyperparameters: "
            f"{sorted(keys)}). Choose the loss in the experiment argument (e.g. experiments/tiny.py:loss="
            f"{spec.name}) so config.loss holds its hyperparameters."
        )
    return spec, spec.hyperparameters(given)


def _reference_mode(config, spec: LossSpec, hparams: dict) -> str:
    mode = config.reference.mode  # checked by rules.py
    if not spec.needs_reference_with(hparams):
        return "none"
    if mode == "cached" and not get_feed(spec.feed).supports_cached:
        raise InputError(f"loss {spec.name!r} needs per-token reference log-probs: set config.reference.mode='model'")
    if config.reference.get("humanline", False) and mode == "cached":
        raise InputError(
            "config.reference.humanline=True clamps per-token log-ratios, which cached (per-sequence) reference "
            "log-probs cannot give: set config.reference.mode='sync' (humanline's) or 'model'"
        )
    return mode


def _humanline(config, spec: LossSpec, hparams: dict) -> tuple[float, float] | None:
    """``(log_epsilon_P, log_epsilon_R)`` when ``config.reference.humanline``, for a loss of per-sequence
    log-ratios (the sequence feeds) that takes a reference; else None."""
    r = config.reference
    if not r.get("humanline", False):
        return None
    if not spec.needs_reference_with(hparams) or spec.feed not in ("unary", "paired"):
        raise InputError(
            f"config.reference.humanline=True: loss {spec.name!r} has no per-sequence policy/reference "
            "log-ratio to clamp; use it with kto, dpo or another loss of unary or paired feedback with a reference"
        )
    return float(r.log_epsilon_P), float(r.log_epsilon_R)


def _paired_options(config, spec: LossSpec, mode: str) -> dict:
    """The paired feed's options (``config.loss.ld_alpha``, ``config.loss.use_weighting``; their values
    checked by rules.py) as Plan fields, refused where they cannot apply."""
    if spec.feed != "paired":
        return {}
    options = spec.options(spec.split_options({k: v for k, v in config.loss.items() if k != "name"})[1])
    ld_alpha, weighting = float(options["ld_alpha"]), bool(options["use_weighting"])
    humanline = config.reference.get("humanline", False)
    if ld_alpha != 1.0 and mode == "cached":
        raise InputError(
            f"config.loss.ld_alpha={ld_alpha}: LD-DPO weights the reference's tokens past the pair's shared length, "
            "which cached (per-sequence) reference log-probs do not hold: set config.reference.mode='model'"
        )
    if (ld_alpha != 1.0 or weighting) and humanline:
        raise InputError(
            "config.reference.humanline=True with config.loss.ld_alpha or config.loss.use_weighting: the clamp and "
            "these reweightings are not defined together; use one of them"
        )
    if weighting and (spec.batch_coupled or isinstance(spec, MixtureSpec)):
        what = (
            "a mixture (its terms are not all per-pair means)"
            if isinstance(spec, MixtureSpec)
            else ("batch-coupled (one pair's loss depends on the others: sorting or a batch mean)")
        )
        raise InputError(
            f"config.loss.use_weighting=True: loss {spec.name!r} is {what}, so it takes no per-pair weights; "
            "use WPO with dpo, ipo, hinge or another per-pair loss"
        )
    return {"ld_alpha": ld_alpha, "pair_weighting": weighting}


def _init_optimizer(config) -> str:
    """``config.init.optimizer``: "" or ``orbax:WORKDIR[@STEP]`` (the path returned)."""
    source = config.init.get("optimizer", "")
    if source and not source.startswith("orbax:"):
        raise InputError(
            f"config.init.optimizer={source!r}: use '' (a fresh optimizer) or 'orbax:WORKDIR[@STEP]' "
            "(an earlier run's optimizer state)"
        )
    return os.path.expanduser(source[6:]) if source else ""


def _data(config, spec: LossSpec) -> None:
    d = config.data
    sources = parse_sources(d.sources) + (parse_sources(d.eval_sources) if d.get("eval_sources") else [])
    if any(s.name == FILES for s in sources):
        if d.eval_files and float(d.holdout_fraction) > 0:
            raise InputError(
                "config.data.eval_files and config.data.holdout_fraction both set: the eval split comes "
                "from one of them; clear the other"
            )
        if d.file_schema not in ("auto", *SCHEMAS):
            raise InputError(f"config.data.file_schema={d.file_schema!r}: use 'auto' or one of {', '.join(SCHEMAS)}")
        parse_columns(d.columns)
    TokenizeConfig(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        chat_template=d.chat_template,
        truncation_mode=d.truncation_mode,
    )
    if d.chat_template not in CHAT_TEMPLATE_NAMES:
        raise InputError(
            f"unknown chat template {d.chat_template!r} (config.data.chat_template); known: {', '.join(CHAT_TEMPLATE_NAMES)}"
        )
    if d.chat_template == "tokenizer":  # the folder's template loads and compiles now, not after the model has
        folder = d.tokenizer or (config.model.name if config.model.name not in PRESETS else "")
        if not folder or folder == "bytes":
            raise InputError(
                f"config.data.chat_template='tokenizer' renders the tokenizer folder's own template, but the "
                f"tokenizer is {folder or 'a preset'!r}: set config.data.tokenizer (or config.model.name) to a "
                "Hugging Face folder with a chat template, or use a built-in template ('halos', 'hh', 'plain')"
            )
        get_chat_template("tokenizer", os.path.expanduser(folder))
    if spec.control_tokens and spec.kind == "sft" and d.sft_examples != "all":
        raise InputError(
            f"loss {spec.name!r} conditions on {'/'.join(spec.control_tokens)} and needs both kinds: "
            "set config.data.sft_examples='all'"
        )
    if spec.control_tokens and spec.kind == "sft" and d.sft_targets != "all":
        # HALOs' CSFT (config/loss/csft.yaml: dataloader ConditionalSFTDataLoader, dataloader.py:615-648)
        # trains every pair's chosen and rejected reply with its control token, not one target per prompt
        raise InputError(
            f"loss {spec.name!r} trains every desirable and undesirable completion (HALOs' "
            "ConditionalSFTDataLoader), not one target per prompt: set config.data.sft_targets='all'"
        )


def _batch(config, spec: LossSpec, needs_kl: bool, mesh: dict) -> None:
    data_ways = mesh["data"] * mesh["fsdp"]
    batch, micro = int(config.train.global_batch_size), int(config.train.num_microbatches)
    if batch % micro or (batch // micro) % data_ways:
        raise InputError(
            f"config.train.global_batch_size={batch} with num_microbatches={micro} must split evenly over the "
            f"{data_ways} data-parallel devices (mesh data x fsdp = {mesh['data']} x {mesh['fsdp']}): use a "
            f"multiple of {data_ways * micro}"
        )
    if needs_kl and batch // micro < 2:
        raise InputError(
            f"loss {spec.name!r} estimates KL within each microbatch and needs at least 2 examples per "
            f"microbatch; got {batch // micro}. Raise config.train.global_batch_size or lower num_microbatches."
        )


def _evaluators(config) -> tuple[str, ...]:
    names = tuple(n.strip() for n in config.eval.evaluators.split(",") if n.strip())
    for name in names:
        if name not in EVALUATORS:
            raise InputError(
                f"config.eval.evaluators: unknown evaluator {name!r}; known: {', '.join(sorted(EVALUATORS))}"
            )
    if config.eval.judge and config.eval.judge not in JUDGES:
        raise InputError(f"unknown judge {config.eval.judge!r} (config.eval.judge); known: {sorted(JUDGES)}")
    if config.eval.judge == "api":  # its settings, before anything runs (the server is asked only at the end)
        ApiJudge.from_config(config.eval.api)
    if config.eval.judge == "reward_model" and not os.path.isfile(
        os.path.join(os.path.expanduser(config.eval.reward_model.path), "config.json")
    ):
        raise InputError(
            f"config.eval.reward_model.path={config.eval.reward_model.path!r} is not an HF model folder "
            "(no config.json): give a *ForSequenceClassification folder"
        )
    against = config.eval.against
    if (
        "pairwise" in names
        and against != "sft_target"
        and not os.path.isfile(os.path.join(os.path.expanduser(against), "samples.jsonl"))
    ):
        raise InputError(
            f"config.eval.against={against!r}: use 'sft_target' (the paper) or a finished run's workdir with samples.jsonl"
        )
    return names


def make_plan(config, num_devices: int) -> Plan:
    """Validate ``config`` for ``num_devices`` devices into a :class:`Plan`; fails naming the field."""
    spec, hparams = _loss(config)
    check_values(config)  # every value's range or choices (kto_jax/train/rules.py), then what needs several
    mode = _reference_mode(config, spec, hparams)
    path = model_source(config)
    model = run_model_config(config, path, model_fields(config))
    check_lora(config, model, mode)
    init = config.init.source
    _data(config, spec)
    _splash_rows(config)
    try:
        mesh = sharding.mesh_shape({k: int(v) for k, v in config.mesh.items()}, num_devices)
    except InputError as e:
        raise InputError(f"config.mesh: {e}") from None
    needs_kl = spec.needs_kl_with(hparams)
    _batch(config, spec, needs_kl, mesh)
    evaluators = _evaluators(config)
    return Plan(
        loss=spec,
        hparams=tuple(sorted(hparams.items())),
        reference_mode=mode,
        model_config=model,
        model_path=path,
        init_checkpoint=os.path.expanduser(init[6:]) if init.startswith("orbax:") else "",
        init_optimizer=_init_optimizer(config),
        init_adapter=os.path.expanduser(config.init.get("adapter", "")),
        mesh_shape=tuple(mesh.items()),
        global_batch_size=int(config.train.global_batch_size),
        num_microbatches=int(config.train.num_microbatches),
        steps=int(config.train.steps),
        chunk_size=int(config.train.chunk_size),
        skip_nonfinite=bool(config.train.skip_nonfinite),
        max_length=int(config.data.max_length),
        seed=int(config.seed),
        evaluators=evaluators,
        packing=bool(config.data.packing),
        pack_length=_pack_length(config),
        sync_every=int(config.reference.get("sync_every", 1)),
        sync_alpha=float(config.reference.get("sync_alpha", 1.0)),
        humanline=_humanline(config, spec, hparams),
        freeze=_freeze(config, spec, model),
        **_paired_options(config, spec, mode),
        data=data_plan(config, PRESETS),
        eval=eval_plan(config, evaluators),
        optimizer=optimizer_plan(config),
        loop=loop_plan(config),
    )


def _freeze(config, spec: LossSpec, model: ModelConfig) -> tuple[str, ...]:
    """``config.train.freeze`` as regexes, each freezing at least one leaf of the policy params (the
    model's, and the feed's own such as offline PPO's ``value_head``) and leaving some leaf to train."""
    freeze = run_freeze(config)
    if freeze:
        feed = get_feed(spec.feed)
        policy = {"model": abstract_params(model), **jax.eval_shape(lambda: feed.init_params(model, 0))}
        trainable.check_freeze(freeze, trainable.leaf_paths(policy))
    return freeze


def _splash_rows(config) -> None:
    """``model.attention_impl='splash'``: every row length the loader can make is a multiple of the
    kernel's smallest block (the packed row, or the padded buckets and their cap max_length)."""
    if config.model.attention_impl != "splash":
        return
    block, d = BLOCK_SIZES[-1], config.data
    lengths = (
        {"pack_length": _pack_length(config)}
        if d.packing
        else {"bucket": int(d.bucket), "max_length": int(d.max_length)}
    )
    for field, value in lengths.items():
        if value % block:
            raise InputError(
                f"config.data.{field}={value}: model.attention_impl='splash' needs rows of a multiple of "
                f"{block} tokens; set config.data.{field} to a multiple of {block} or model.attention_impl=''"
            )


def _pack_length(config) -> int:
    """``config.data.pack_length`` resolved (0 = max_length); a row must hold the longest example."""
    d = config.data
    length = int(d.pack_length) or int(d.max_length)
    if length < int(d.max_length):
        raise InputError(
            f"config.data.pack_length={d.pack_length} is shorter than config.data.max_length={d.max_length}: "
            "a packed row must hold the longest example; set pack_length=0 (max_length) or >= max_length"
        )
    return length
