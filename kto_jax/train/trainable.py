"""Which parameters train: a static label per leaf from regexes over the '/'-joined param paths.

    trainable, frozen = split(params, freeze)       # two nested dicts, each without the other's leaves
    params = merge(trainable, frozen)               # the whole tree again, the same buffers

``freeze`` is ``config.train.freeze`` parsed: a tuple of regexes, each matched in full
(``re.fullmatch``, as big_vision's ``make_mask_trees``) against the path of a leaf of the policy
params, e.g. ``model/embed/embedding``, ``model/layers/attention/q/kernel``, ``value_head/...``.
A leaf a regex matches is frozen: it gets no gradient, no accumulator and no optimizer state, is
not donated to the step, and is not saved in the run's checkpoints (it is the initial weights'
leaf, which the run's init source gives back). Everything else trains. A frozen leaf and a
trainable one are told apart by their path alone, so the labels are static (known before anything
is allocated) and the loss, the feeds and the step never see them: the step merges the two trees
and differentiates with respect to the trainable one.
"""

from __future__ import annotations

import re

from flax import traverse_util

from kto_jax.errors import InputError

SEP = "/"


def parse_freeze(text: str) -> tuple[str, ...]:
    """``config.train.freeze`` ("a,b", spaces allowed) -> its regexes, in order; "" -> ()."""
    return tuple(part.strip() for part in str(text).split(",") if part.strip())


def leaf_paths(params) -> list[str]:
    """The '/'-joined paths of a nested dict's leaves (boxed leaves such as ``nn.Partitioned`` are leaves)."""
    return list(traverse_util.flatten_dict(params, sep=SEP))


def is_frozen(path: str, freeze: tuple[str, ...]) -> bool:
    """Whether some regex of ``freeze`` matches the whole of ``path``."""
    return any(re.fullmatch(pattern, path) for pattern in freeze)


def split(params, freeze: tuple[str, ...]) -> tuple[dict, dict]:
    """``(trainable, frozen)``: ``params`` cut in two by :func:`is_frozen`, nested dicts of the same
    leaves (no copies); a subtree with no leaf left is absent. With ``freeze == ()`` the trainable
    tree is ``params`` itself and the frozen one is ``{}``."""
    if not freeze:
        return params, {}
    flat = traverse_util.flatten_dict(params, sep=SEP)
    frozen = {k: v for k, v in flat.items() if is_frozen(k, freeze)}
    trainable = {k: v for k, v in flat.items() if k not in frozen}
    return traverse_util.unflatten_dict(trainable, sep=SEP), traverse_util.unflatten_dict(frozen, sep=SEP)


def merge(trainable, frozen) -> dict:
    """The whole param tree from the two halves of :func:`split` (``frozen`` may be ``{}`` or None)."""
    if not frozen:
        return trainable
    flat = traverse_util.flatten_dict(trainable, sep=SEP)
    flat.update(traverse_util.flatten_dict(frozen, sep=SEP))
    return traverse_util.unflatten_dict(flat, sep=SEP)


def check_freeze(freeze: tuple[str, ...], paths: list[str], field: str = "config.train.freeze") -> None:
    """Every regex must be valid and freeze at least one leaf, and some leaf must still train;
    raises InputError naming the regex (and a few of the paths it could have matched)."""
    for pattern in freeze:
        try:
            re.compile(pattern)
        except re.error as e:
            raise InputError(f"{field}: {pattern!r} is not a regular expression ({e})") from None
        if not any(re.fullmatch(pattern, path) for path in paths):
            shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
            raise InputError(
                f"{field}: {pattern!r} matches no parameter (a regex matched in full against the '/'-joined "
                f"param paths: {shown}); e.g. 'model/embed/.*' freezes the embeddings"
            )
    if paths and all(is_frozen(path, freeze) for path in paths):
        raise InputError(f"{field}={','.join(freeze)!r} freezes every parameter: nothing would train")
