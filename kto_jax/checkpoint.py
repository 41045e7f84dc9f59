"""Orbax checkpoints of a run: train state, data-loader position, config and provenance.

One checkpoint (``WORKDIR/checkpoints/<step>/``) holds the train state (policy params,
optimizer state, step, RNG, loss state), the loader state (to resume at the exact next
batch) and ``meta``: the config and where the reference model came from (its source and a
fingerprint; the reference weights are not saved again). Saves are asynchronous, every N
steps and/or every M minutes, keeping the last K plus the best by a chosen eval metric.
Orbax writes each checkpoint to a temporary folder and renames it when complete, so a
half-written checkpoint is never picked up; a complete but unreadable newest checkpoint
makes the run fall back to the previous one with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging as pylogging
import os
import shutil

import jax
import orbax.checkpoint as ocp
from absl import logging
from orbax.checkpoint import checkpoint_managers as policies

from kto_jax import faults
from kto_jax.errors import InputError, MissingInput

CHECKPOINT_DIR = "checkpoints"


class _ReadOnlyNotice(pylogging.Filter):
    """Drops orbax's two warnings on every read-only manager (``load_params`` opens one for each
    ``init.source=orbax:...``): reading an earlier run's weights is what was asked for."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        text = str(record.msg)
        return not (
            text.startswith("CheckpointManagerOptions.read_only=True")
            or text.startswith("Given directory is read only")
        )


pylogging.getLogger("absl").addFilter(_ReadOnlyNotice())


def complete_steps(directory: str) -> list[int]:
    """The steps of the complete checkpoints in ``directory`` (orbax renames a finished save to
    its step; one under way is ``<step>.orbax-checkpoint-tmp-*``), without opening any."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
    )


_UINT = {1: jax.numpy.uint8, 2: jax.numpy.uint16, 4: jax.numpy.uint32}


@jax.jit
def _leaf_digest(x):
    """Two order-free integer sums of a leaf's bit patterns ``b_i`` (as uint32, modulo 2**32):
    ``sum_i b_i`` and ``sum_i b_i * (2654435761 * i + 1)``, the second telling a permutation (a
    transposed square matrix) from the original. Integer addition is associative, so unlike a
    float sum neither depends on XLA's reduction order: the same weights give the same digest on
    any processor, compiler flags, mesh or number of processes."""
    if x.dtype == jax.numpy.bool_:
        x = x.astype(jax.numpy.uint8)
    u32 = jax.numpy.uint32
    bits = jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize]).astype(u32)
    index, stride = (
        jax.numpy.zeros(x.shape, u32),
        1,
    )  # the row-major index, built elementwise (no reshape of a sharded leaf)
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(u32, x.shape, axis) * u32(stride % 2**32)
        stride *= x.shape[axis]
    position = index * u32(2654435761) + u32(1)
    return jax.numpy.stack([jax.numpy.sum(bits, dtype=u32), jax.numpy.sum(bits * position, dtype=u32)])


def fingerprint(params) -> str:
    """A short hash of a param tree's structure, shapes, dtypes and values (the exact bits: see
    ``_leaf_digest``), equal wherever the same weights are loaded."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    digests = jax.device_get([_leaf_digest(x) for x in leaves])
    text = repr(treedef) + repr([(x.shape, str(x.dtype)) for x in leaves]) + repr([d.tolist() for d in digests])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Checkpointer:
    """Periodic, asynchronous saves and fault-tolerant restores of one run's checkpoints."""

    def __init__(
        self,
        workdir: str,
        *,
        every_steps: int = 0,
        every_minutes: float = 0.0,
        keep_last: int = 2,
        best_metric: str = "",
        best_mode: str = "min",
        read_only: bool = False,
    ):
        save = [policies.PreemptionCheckpointingPolicy()]
        if every_steps:
            save.append(policies.FixedIntervalPolicy(int(every_steps)))
        if every_minutes:
            save.append(policies.ContinuousCheckpointingPolicy(minimum_interval_secs=int(every_minutes * 60)))
        keep = [policies.LatestN(int(keep_last))]
        if best_metric:
            keep.append(
                policies.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse={"min": True, "max": False}[best_mode],  # the value's rule: rules.py
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        self.best_metric = best_metric
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_decision_policy=policies.AnySavePolicy(save),
                preservation_policy=policies.AnyPreservationPolicy(keep),
                enable_async_checkpointing=True,
                create=not read_only,
                read_only=read_only,
            ),
        )

    def save(
        self, step: int, state, loader_state: dict, meta: dict, metrics: dict | None = None, force: bool = False
    ) -> bool:
        """Save if a policy says so (or ``force``); returns whether a save started."""
        if metrics is not None and self.best_metric and self.best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            loader=ocp.args.JsonSave(loader_state),
            meta=ocp.args.JsonSave(meta),
        )
        with self._disk_full_is_clear():  # a failed earlier async save surfaces here
            started = self.manager.save(step, args=args, metrics=metrics, force=force)
        if started:
            faults.point("checkpoint.save")
        return started

    def wait(self) -> None:
        with self._disk_full_is_clear():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._disk_full_is_clear():
            self.manager.wait_until_finished()
        self.manager.close()

    @contextlib.contextmanager
    def _disk_full_is_clear(self):
        """A save that failed for lack of space becomes :class:`CheckpointNotSaved` (its partial
        temporary folder removed, the complete checkpoints untouched); other errors pass."""
        try:
            yield
        except Exception as e:
            text = str(e)
            if not (getattr(e, "errno", None) == errno.ENOSPC or "No space left on device" in text):
                raise
            for name in os.listdir(self.directory):
                if ".orbax-checkpoint-tmp" in name:
                    shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
            kept = complete_steps(self.directory)
            resume = f"it resumes from step {kept[-1]}" if kept else "it starts afresh"
            raise CheckpointNotSaved(
                f"checkpoint not saved: no space left on device in {self.directory} ({text.splitlines()[0][:200]}); "
                f"the complete checkpoints there ({kept}) are intact. Free space (or move the workdir to a larger "
                f"disk) and rerun the same command: {resume}"
            ) from None

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_latest(self, state_like):
        """``(step, state, loader_state, meta)`` of the newest readable checkpoint, or None if there is none.

        An unreadable (corrupted, truncated) newer checkpoint is moved aside to
        ``<step>.unreadable`` with a warning and the previous one is used. If checkpoints exist
        but none is readable, nothing is moved and the error names them and the fix. A state of
        another shape (another model) is an error, not a fallback.
        """
        unreadable = []
        for step in reversed(self.steps()):
            where = f"{self.directory}/{step}"
            try:
                meta = self.restore_meta(step)
            except Exception as e:  # a corrupted or truncated checkpoint
                unreadable.append((step, e))
                continue
            check_compatible(meta, state_like, where)
            try:
                state, loader_state = self.restore_state(step, state_like)
            except Exception as e:
                unreadable.append((step, e))
                continue
            for bad, error in unreadable:
                self._set_aside(bad, error)
            return step, state, loader_state, meta
        if unreadable:
            details = "; ".join(
                f"{self.directory}/{step}: {type(e).__name__}: {str(e)[:200]}" for step, e in unreadable
            )
            raise UnreadableCheckpoint(
                f"no readable checkpoint in {self.directory} ({details}). Delete the unreadable checkpoints (or move them "
                "away) to start this run afresh, or use a new --workdir."
            )
        return None

    def _set_aside(self, step: int, error: Exception) -> None:
        where = os.path.join(self.directory, str(step))
        aside = f"{where}.unreadable"
        n = 1
        while os.path.exists(aside):
            aside, n = f"{where}.unreadable{n}", n + 1
        if jax.process_index() == 0:
            os.replace(where, aside)
        logging.warning(
            "checkpoint %s is unreadable (%s: %s); falling back to the previous one (the unreadable one is kept as %s)",
            where,
            type(error).__name__,
            str(error)[:300],
            aside,
        )
        self.manager.reload()

    def restore_state(self, step: int, state_like):
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(state_like)),
                loader=ocp.args.JsonRestore(),
            ),
        )
        return restored["state"], restored["loader"]


class IncompatibleCheckpoint(InputError):
    """A checkpoint of another model or run setup than the current config."""


class UnreadableCheckpoint(InputError, RuntimeError):
    """Checkpoints exist but none can be restored."""


class CheckpointNotSaved(OSError):
    """A checkpoint could not be written (the disk is full); the earlier ones are intact."""


def check_compatible(meta: dict, state_like, where: str) -> None:
    """The checkpoint's param shapes must match the current state's."""
    saved = meta.get("param_shapes")
    current = param_shapes(state_like.params)
    if saved is not None and saved != current:
        diff = [
            (k, saved.get(k), current.get(k))
            for k in sorted(set(saved) | set(current))
            if saved.get(k) != current.get(k)
        ][:3]
        raise IncompatibleCheckpoint(
            f"checkpoint {where} was written for another model (config model {meta.get('model')!r}); "
            f"param shapes differ, e.g. {diff}. Use a new --workdir, or the config the checkpoint was written with "
            "(its config.json)."
        )


def param_shapes(params) -> dict:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): list(x.shape) for path, x in flat}


def _open_step(workdir_and_step: str, where: str) -> tuple[Checkpointer, int, dict]:
    """``(read-only checkpointer, step, its meta)`` of ``WORKDIR`` (latest step) or ``WORKDIR@STEP``;
    ``where`` (the config field and value) names a missing folder or step."""
    workdir, _, step = workdir_and_step.partition("@")
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), CHECKPOINT_DIR)
    if not os.path.isdir(directory):
        raise MissingInput(f"no checkpoint in {directory!r} ({where}): is it the workdir of a finished kto_jax run?")
    checkpointer = Checkpointer(workdir, read_only=True)
    steps = checkpointer.steps()
    if not steps:
        raise MissingInput(f"no checkpoint in {checkpointer.directory!r} ({where})")
    step = int(step) if step else steps[-1]
    if step not in steps:
        raise MissingInput(f"{checkpointer.directory!r} has no step {step}; it has {steps} ({where})")
    return checkpointer, step, checkpointer.restore_meta(step)


def _restore_part(checkpointer: Checkpointer, step: int, item: dict) -> dict:
    """The part ``item`` (abstract arrays under the state's own keys) of a checkpoint's state;
    the checkpointer is closed."""
    try:
        return checkpointer.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(
                    item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
                ),
            ),
        )["state"]
    finally:
        checkpointer.close()


def load_opt_state(workdir_and_step: str, opt_state_like, optimizer: dict):
    """The optimizer state of a run's checkpoint (``WORKDIR`` latest, or ``WORKDIR@STEP``), for
    ``config.init.optimizer``: that run's ``config.train.optimizer`` must equal ``optimizer`` in
    every field that shapes the state (its name; the same params make the same shapes)."""
    where = f"config.init.optimizer=orbax:{workdir_and_step}"
    checkpointer, step, meta = _open_step(workdir_and_step, where)
    saved = meta.get("config", {}).get("train", {}).get("optimizer", {})
    if saved.get("name") != optimizer.get("name"):
        checkpointer.close()
        raise IncompatibleCheckpoint(
            f"{where}: that run's optimizer is {saved.get('name')!r}, this one's "
            f"{optimizer.get('name')!r} (config.train.optimizer.name): use the same optimizer"
        )
    try:
        restored = _restore_part(checkpointer, step, {"opt_state": abstract_like(opt_state_like)})
    except (ValueError, KeyError, TypeError) as e:
        raise IncompatibleCheckpoint(
            f"{where}: its optimizer state does not fit this run's ({type(e).__name__}: "
            f"{str(e)[:200]}): use the same model and config.train.optimizer"
        ) from None
    return restored["opt_state"], step


def load_params(workdir_and_step: str, params_like, where: str = ""):
    """The model's trained params from a run's checkpoint (``WORKDIR`` latest, or ``WORKDIR@STEP``):
    ``params_like``'s leaves, the trainable ones of that run (``kto_jax.train.setup.load_run`` puts
    them over the frozen ones)."""
    where = where or f"config.init.source=orbax:{workdir_and_step}"
    checkpointer, step, meta = _open_step(workdir_and_step, where)
    saved = meta.get("param_shapes", {})
    current = {f"['model']{k}": v for k, v in param_shapes(params_like).items()}
    model_only = {k: v for k, v in saved.items() if k.startswith("['model']")}
    if model_only and model_only != current:
        checkpointer.close()
        raise IncompatibleCheckpoint(
            f"{where}: that run trained model {meta.get('model')!r}, whose shapes "
            "differ from config.model; set config.model.name to the same model"
        )
    if not params_like:  # every model param frozen (nothing of the model saved)
        checkpointer.close()
        return {}, step
    return _restore_part(checkpointer, step, {"params": {"model": abstract_like(params_like)}})["params"]["model"], step
