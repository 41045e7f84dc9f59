"""TRL's KTOTrainer / DPOTrainer on the length-realistic examples of ``scripts/bench.py --lengths``.

    python scripts/trl_lengths_anchor.py kto mix [--batches 8] [--rounds 2]   # in a venv with torch, trl

Run it in a separate virtual environment (``pip install torch==2.13.0 trl``), right before or
after scripts/bench.py with the same flags, and compare useful tokens/s in one run. The model,
tokenizer (one token per character) and settings are ../shared/anchors' (fp32, CPU, the
reference model in the step, batch 8); the examples are scripts/lengths.py's, the same texts
kto-jax benches; max_length 512 and max_prompt_length 256 (HALOs). TRL pads each batch to its
longest sequence. Useful tokens: the real tokens of the training sequences after truncation
(prompt kept at its end to max_prompt_length when prompt + completion exceed max_length, then the
completion cut to fit; completions end in EOS), counted from the examples each step trained on.
Prints one JSON line.
"""

import argparse
import json
import os
import random
import sys
import time

import torch
from datasets import Dataset
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lengths  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("loss", choices=["kto", "dpo"])
parser.add_argument("source")
parser.add_argument("--batch", type=int, default=8)
parser.add_argument("--batches", type=int, default=8)
parser.add_argument("--rounds", type=int, default=2)
parser.add_argument("--max_length", type=int, default=512)
parser.add_argument("--max_prompt_length", type=int, default=256)
args = parser.parse_args()

torch.manual_seed(0)
random.seed(0)
chars = sorted(set(lengths.CHARS))
vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
for c in chars:
    vocab[c] = len(vocab)
tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
cfg = LlamaConfig(
    vocab_size=2048,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    max_position_embeddings=args.max_length,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
model = LlamaForCausalLM(cfg)
ref = LlamaForCausalLM(cfg)
ref.load_state_dict(model.state_dict())

kind = "paired" if args.loss == "dpo" else "unary"
n = args.batch * args.batches
rows = lengths.example_texts(kind, args.source, n, seed=0)


def kept(prompt: int, completion: int) -> int:
    """Real tokens of one sequence after truncation (completion + EOS)."""
    completion += 1
    if prompt + completion > args.max_length:
        prompt = min(prompt, args.max_prompt_length)
        completion = min(completion, args.max_length - prompt)
    return prompt + completion


if kind == "paired":
    useful = [kept(len(r["prompt"]), len(r["chosen"])) + kept(len(r["prompt"]), len(r["rejected"])) for r in rows]
else:
    useful = [kept(len(r["prompt"]), len(r["completion"])) for r in rows]
steps = args.batches * (args.rounds + 1)  # the first pass is the warm-up, as the bench's compile pass
times = []


class Timer(TrainerCallback):
    def on_step_begin(self, a, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, a, state, control, **kw):
        times.append(time.perf_counter() - self.t)


common = dict(
    per_device_train_batch_size=args.batch,
    max_steps=steps,
    learning_rate=1e-5,
    logging_steps=1000,
    save_strategy="no",
    report_to=[],
    max_length=args.max_length,
    use_cpu=True,
    dataloader_num_workers=0,
    beta=0.1,
    bf16=False,
)
if kind == "paired":
    from trl import DPOConfig as Config
    from trl import DPOTrainer as Trainer
else:
    from trl import KTOConfig as Config
    from trl import KTOTrainer as Trainer
fields = Config.__dataclass_fields__
if "max_prompt_length" in fields:
    common["max_prompt_length"] = args.max_prompt_length
if "train_sampling_strategy" in fields:
    common["train_sampling_strategy"] = "sequential"
config = Config(output_dir=f"/tmp/trl-lengths-{args.loss}", **common)
trainer = Trainer(
    model=model,
    ref_model=ref,
    args=config,
    train_dataset=Dataset.from_list(rows),
    processing_class=tok,
    callbacks=[Timer()],
)
sequential = "train_sampling_strategy" in fields
trainer.train()
timed = times[args.batches :]
# with sequential sampling step s trains examples [s*B, (s+1)*B) of the (cycled) dataset
tokens = (
    sum(
        sum(useful[(s % args.batches) * args.batch : (s % args.batches + 1) * args.batch])
        for s in range(args.batches, steps)
    )
    if sequential
    else sum(useful) / args.batches * len(timed)
)
print(
    json.dumps(
        {
            "impl": "trl",
            "loss": args.loss,
            "lengths": args.source,
            "useful_tokens_per_s": round(tokens / sum(timed), 1),
            "step_s": round(sum(timed) / len(timed), 4),
            "sequential": sequential,
            "threads": torch.get_num_threads(),
            "max_length": args.max_length,
            "batch": args.batch,
        }
    )
)
