"""TFDS builder for the embedded synthetic task (``kto_jax.data.synthetic``): no download."""

from __future__ import annotations

import tensorflow_datasets as tfds

from kto_jax.data import synthetic
from kto_jax.data.builders.base import FeedbackBuilder, paired_features, turns, unary_features

SIZES = {"train": 20000, "validation": 500, "test": 1000}


class Synthetic(FeedbackBuilder):
    """ "Shout WORD!" -> " WORD": ``paired`` (chosen/rejected) or ``unary`` (one judged completion)."""

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="paired", description="one desirable and one undesirable completion per prompt"),
        tfds.core.BuilderConfig(name="unary", description="one completion per prompt, desirable half the time"),
    ]

    def _features(self):
        return paired_features() if self.builder_config.name == "paired" else unary_features()

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in SIZES}

    def _generate_examples(self, split):
        make = synthetic.paired_example if self.builder_config.name == "paired" else synthetic.unary_example
        for index in range(SIZES[split]):
            record = make(split, index)
            record["prompt"] = turns(("user", record["prompt"]))
            yield record["id"], record
