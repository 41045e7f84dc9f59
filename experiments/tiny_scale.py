"""Three tiny model sizes on the synthetic task: the scale curves in miniature, on CPU.

    --config experiments/tiny_scale.py:model=tiny-5m,loss=kto,sft=true

sft=true starts from ``{runs}/sft_{model}`` (the SFT run of the same size) and reports the
win rate against it; sft=false aligns the randomly initialised model directly (against the
SFT run as baseline too). The sweep is experiments/sweeps/tiny_scale.py.
"""

from kto_jax.config import parse_arg, tiny_config

MODELS = ("tiny-1m", "tiny-5m", "tiny-25m")
ARGS = ("model", "loss", "sft", "runs", "steps")


def get_config(arg: str = ""):
    args = parse_arg(arg, ARGS, "experiments/tiny_scale.py")
    model, loss = args.get("model", "tiny-1m"), args.get("loss", "kto")
    runs = args.get("runs", "runs/tiny_scale")
    sft_dir = f"{runs}/sft_{model}"
    supervised = loss in ("sft", "csft")
    steps = int(args.get("steps", 600 if supervised else 200))
    init = f"orbax:{sft_dir}" if args.get("sft", "true") == "true" and not supervised else ""
    c = tiny_config(loss=loss, steps=steps, init=init, model=model)
    c.eval.baseline = "" if supervised else sft_dir
    return c
