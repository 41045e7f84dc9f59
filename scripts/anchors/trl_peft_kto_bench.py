"""Anchor: TRL's KTOTrainer / DPOTrainer with a peft LoRA adapter, step time on CPU, on scripts/bench.py's
shape (a Llama of ~27M parameters: hidden 512, 8 layers, 8 heads, ffn 1376, vocab 2048; batch 8,
64 prompt + 64 completion tokens; fp32), as ../shared/anchors/trl_kto_bench.py measures full training.

    python scripts/anchors/trl_peft_kto_bench.py kto|dpo RANK ALPHA      # in a venv with torch, trl, peft

With a peft model and no ref_model, TRL scores the reference with the adapters disabled (the base), as
kto-jax does. Prints one JSON line with median_step_s and tokens_per_s (training sequences only).
Run in its own virtual environment (pip install torch==2.13.0 trl peft datasets), alternating with
``python scripts/bench.py --losses=kto --modes=model --lora_rank=RANK --lora_alpha=ALPHA``.
"""

import json
import random
import sys
import time

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

torch.manual_seed(0)
random.seed(0)
loss = sys.argv[1] if len(sys.argv) > 1 else "kto"
rank = int(sys.argv[2]) if len(sys.argv) > 2 else 16
alpha = float(sys.argv[3]) if len(sys.argv) > 3 else 32.0
chars = [chr(i) for i in range(32, 127)]
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
    max_position_embeddings=256,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)
model = LlamaForCausalLM(cfg)
lora = LoraConfig(
    r=rank,
    lora_alpha=alpha,
    lora_dropout=0.0,
    task_type="CAUSAL_LM",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
)


def rs(n):
    return "".join(random.choice(chars) for _ in range(n))


B, STEPS = 8, 12
times = []


class T(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        self.t = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter() - self.t)


common = dict(
    per_device_train_batch_size=B,
    max_steps=STEPS,
    learning_rate=1e-4,
    logging_steps=1000,
    save_strategy="no",
    report_to=[],
    max_length=128,
    use_cpu=True,
    dataloader_num_workers=0,
    beta=0.1,
    bf16=False,
)
if loss == "kto":
    rows = [{"prompt": rs(64), "completion": rs(63), "label": bool(i % 2)} for i in range(256)]
    args = KTOConfig(output_dir="/tmp/trl-peft-kto", **common)
    trainer = KTOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[T()],
    )
    tokens = B * 128
else:
    rows = [{"prompt": rs(64), "chosen": rs(63), "rejected": rs(63)} for i in range(256)]
    args = DPOConfig(output_dir="/tmp/trl-peft-dpo", **common)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        peft_config=lora,
        callbacks=[T()],
    )
    tokens = 2 * B * 128
trainer.train()
steady = sorted(times[2:])
med = steady[len(steady) // 2]
print(
    json.dumps(
        {
            "impl": "trl+peft",
            "loss": loss,
            "rank": rank,
            "alpha": alpha,
            "median_step_s": med,
            "tokens_per_s": tokens / med,
            "threads": torch.get_num_threads(),
        }
    )
)
