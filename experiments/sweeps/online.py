"""online: three online rounds of KTO (binary feedback) and of DPO (pairwise feedback), both from
runs/sft (first: python -m kto_jax.train --config experiments/tiny.py:loss=sft,steps=600 --workdir runs/sft).

    python scripts/sweep.py experiments/sweeps/online.py --launcher slurm --gpus-per-node 8 --dry-run
"""

from kto_jax.sweeps import zipped


def get_sweep():
    runs = zipped(
        "experiments/online.py",
        module="kto_jax.online",
        loss=["kto", "dpo"],
        feedback=["binary", "pairwise"],
        init=["orbax:runs/sft"] * 2,
    )
    return [{**r, "name": f"online_{r['args']['loss']}"} for r in runs]
