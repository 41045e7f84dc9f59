"""Write a realistic feedback file (kto_jax/data/example_feedback.py) to try the file source on.

    python scripts/make_feedback.py --kind binary --n 400 --malformed 3 --out data/feedback.jsonl
    python -m kto_jax.train --config experiments/smol.py:loss=kto --workdir runs/smol-kto \
        --config.data.sources=files:data/feedback.jsonl --config.data.holdout_fraction=0.1 \
        --config.data.skip_bad_records=True
"""

from __future__ import annotations

from absl import app, flags

from kto_jax.data.example_feedback import write_jsonl

_KIND = flags.DEFINE_enum("kind", "binary", ["binary", "preference"], "Thumbs up/down (KTO) or chosen/rejected (DPO).")
_N = flags.DEFINE_integer("n", 400, "Records to write.")
_MALFORMED = flags.DEFINE_integer(
    "malformed", 0, "Bad lines to mix in (0-3): a cut-off line, a missing field, a bad value."
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")
_OUT = flags.DEFINE_string("out", None, "Output .jsonl file.")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    counts = write_jsonl(_OUT.value, _KIND.value, _N.value, seed=_SEED.value, malformed=_MALFORMED.value)
    print(f"wrote {_OUT.value}: {counts}")


if __name__ == "__main__":
    app.run(main)
