"""The reward-model judge: tiny random HF *ForSequenceClassification checkpoints (Llama with GQA, GPT-NeoX,
Qwen2, Qwen3) scored in JAX as transformers scores them; verdicts from the scores; 8 simulated devices =
1 device; a folder without a score head is refused by name."""

import json
import math
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    Gemma2Config,
    Gemma2ForSequenceClassification,
    Gemma3TextConfig,
    Gemma3TextForSequenceClassification,
    GPTNeoXConfig,
    GPTNeoXForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    Qwen2Config,
    Qwen2ForSequenceClassification,
    Qwen3Config,
    Qwen3ForSequenceClassification,
)

from kto_jax.judges.reward_model import (
    RewardModelJudge,
    bucket_length,
    sigmoid,
    truncate_left,
    verdict,
)
from kto_jax.models.reward import load_reward_model, sequence_scores
from tests.hf_checkpoints import hf_logits as hf_scores  # a classification head's logits are its scores
from tests.hf_checkpoints import max_diff, perturb_vectors

TOL = 1e-4
VOCAB, PAD = 101, 0
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = [
    "<|",
    "|>",
    "user",
    "assistant",
    "system",
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "dog",
    "ran",
    "fast",
    "good",
    "bad",
    "what",
    "is",
    "two",
    "plus",
    "one",
    "three",
    "yes",
    "no",
    "hello",
    "world",
    "please",
    "tell",
    "me",
    "about",
    "it",
    "sure",
    "here",
    "you",
    "go",
    "thanks",
]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)
SMALL = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "initializer_range": 0.25,
    "pad_token_id": PAD,
}
FAMILIES = {
    "llama": lambda: LlamaForSequenceClassification(LlamaConfig(**SMALL, num_key_value_heads=2, num_labels=1)),
    # two labels: sequence_scores keeps [B, num_labels]
    "gpt_neox": lambda: GPTNeoXForSequenceClassification(GPTNeoXConfig(**SMALL, rotary_pct=0.25, num_labels=2)),
    "qwen2": lambda: Qwen2ForSequenceClassification(Qwen2Config(**SMALL, num_key_value_heads=2, num_labels=1)),
    # head_dim 32 != hidden 64 / 4 heads; per-head q/k norms
    "qwen3": lambda: Qwen3ForSequenceClassification(
        Qwen3Config(**SMALL, num_key_value_heads=2, head_dim=32, num_labels=1)
    ),
    # soft-caps, a 4-token window on the first layer (rows are longer), (1 + w) sandwich norms
    "gemma2": lambda: Gemma2ForSequenceClassification(
        Gemma2Config(
            **SMALL,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=4,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            num_labels=1,
        )
    ),
    # q/k norms, the local RoPE base on the sliding layer
    "gemma3": lambda: Gemma3TextForSequenceClassification(
        Gemma3TextConfig(
            **SMALL,
            num_key_value_heads=1,
            head_dim=16,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_local_base_freq=100.0,
            num_labels=1,
        )
    ),
}
ITEMS = [  # (turns, first, second)
    ((("user", "what is two plus one"),), "three", "two"),
    ((("system", "please tell me"), ("user", "hello world")), "sure here you go", "no"),
    ((("user", "the cat sat on a mat"), ("assistant", "yes"), ("user", "tell me about it")), "good cat", "bad dog ran"),
    ((("user", "hello"),), "thanks", "thanks"),
    ((("user", " ".join(WORDS[5:] * 3)),), "the dog ran fast", "a cat"),  # a long prompt: cut on the left
]


def write_tokenizer(folder: str) -> None:
    """A word-level tokenizer.json (specials first) and a tokenizer_config.json with a Jinja chat template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "chat_template": TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """family -> (folder, transformers model), each saved once with its tokenizer."""
    out = {}
    for seed, (name, make) in enumerate(FAMILIES.items()):
        torch.manual_seed(seed)
        model = make().float().eval()
        perturb_vectors(model, seed)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        write_tokenizer(folder)
        out[name] = (folder, model)
    return out


def right_padded(lengths, length, seed=0):
    """Random non-pad ids right-padded with PAD, and their mask."""
    ids = np.random.default_rng(seed).integers(1, VOCAB, size=(len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    return np.where(mask == 1, ids, PAD), mask


def judge_cfg(folder, **kw):
    return ml_collections.ConfigDict(
        {"path": folder, "batch_size": 4, "max_length": 24, "chat_template": "tokenizer", **kw}
    )


@pytest.fixture(scope="module")
def judge(folders):
    return RewardModelJudge.from_config(judge_cfg(folders["llama"][0]))


# ---------------------------------------------------------------- (a) scores equal transformers'


@pytest.mark.parametrize("family", list(FAMILIES))
def test_scores_equal_transformers(folders, family):
    folder, hf_model = folders[family]
    model, params, kernel = load_reward_model(folder)
    assert "lm_head" not in params and kernel.shape == (64, hf_model.config.num_labels)
    ids, mask = right_padded([12, 7, 3, 10], 12, seed=len(family))
    ours = np.asarray(jax.jit(sequence_scores, static_argnums=0)(model, params, kernel, ids, mask))
    theirs = hf_scores(hf_model, ids, mask)
    assert ours.shape == theirs.shape == (4, hf_model.config.num_labels)
    diff = max_diff(ours, theirs)
    print(f"{family}: max |score diff| vs transformers = {diff:.2e}")
    assert diff < TOL, diff
    assert np.std(theirs) > 1e-2  # the scores differ between rows: the test can see a wrong pooling


def test_judge_encodes_as_apply_chat_template_and_scores_as_transformers(folders, judge):
    folder, hf_model = folders["llama"]
    hf_tok = AutoTokenizer.from_pretrained(folder)
    n = judge.max_length
    for turns, first, _ in ITEMS:
        messages = [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": first}]
        full = list(hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        expected = full if len(full) <= n else full[:1] + full[len(full) - n + 1 :]  # cut on the left, BOS kept
        assert judge.encode(turns, first) == expected
        assert abs(judge.scores([(turns, first)])[0] - float(hf_scores(hf_model, [expected])[0, 0])) < TOL


# ---------------------------------------------------------------- (b) verdicts from the scores


def test_compare_winners_follow_scores(judge):
    verdicts = judge.compare(ITEMS)
    scores = judge.scores([(t, a) for t, a, _ in ITEMS] + [(t, b) for t, _, b in ITEMS])
    assert len(verdicts) == len(ITEMS)
    for k, v in enumerate(verdicts):
        s1, s2 = scores[k], scores[k + len(ITEMS)]
        assert v.winner == ("first" if s1 > s2 else "second" if s2 > s1 else "tie")
        assert v.raw == f"{s1:.6f} {s2:.6f}"
        assert v.p_first == pytest.approx(1 / (1 + math.exp(-(s1 - s2))), abs=1e-12)
    assert {v.winner for v in verdicts} >= {"first", "second"}  # both outcomes occur: the scores decide
    assert judge.key.startswith(f"reward_model:{judge.path}:") and judge.unary is False


def test_verdict_tie_and_sigmoid():
    assert verdict(0.5, 0.5).winner == "tie" and verdict(0.5, 0.5).p_first == 0.5
    assert verdict(2.0, -1.0).winner == "first" and verdict(-1.0, 2.0).winner == "second"
    assert sigmoid(1000.0) == 1.0 and sigmoid(-1000.0) == 0.0


def test_truncation_keeps_bos_and_answer(judge):
    turns, answer, _ = ITEMS[-1]
    ids = judge.encode(turns, answer)
    full = truncate_left(*_split(judge, turns, answer), max_length=10_000, bos_id=judge.tokenizer.bos_id)
    assert len(full) > judge.max_length and len(ids) == judge.max_length
    assert ids[0] == judge.tokenizer.token_id("<s>") and ids[1:] == full[len(full) - judge.max_length + 1 :]
    assert truncate_left([9, 1, 2, 3], [4, 5], 4, bos_id=9) == [9, 3, 4, 5]
    assert truncate_left([1, 2, 3], [4, 5, 6], 2, bos_id=None) == [5, 6]
    assert [bucket_length(n, 24) for n in (1, 16, 17, 24)] == [16, 16, 24, 24]


def _split(judge, turns, answer):
    from kto_jax.data.tokenize import encode_pair

    return encode_pair(judge.tokenizer, *judge.render(turns, answer))


# ---------------------------------------------------------------- (c) 8 devices = 1 device

EIGHT_DEVICES = """
import json, sys
import jax
jax.config.update("jax_default_matmul_precision", "highest")
import ml_collections
from kto_jax.judges.reward_model import RewardModelJudge
folder, items_file = sys.argv[1:]
judge = RewardModelJudge.from_config(ml_collections.ConfigDict(
    dict(path=folder, batch_size=4, max_length=24, chat_template="tokenizer")))
assert jax.device_count() == 8 and judge.mesh is not None and judge.batch_size == 8
items = [(tuple(map(tuple, t)), a) for t, a in json.load(open(items_file))]
print("SCORES", json.dumps(judge.scores(items)))
"""


def test_eight_devices_equal_one(folders, judge, tmp_path):
    items = [(t, a) for t, a, _ in ITEMS] + [(t, b) for t, _, b in ITEMS]
    items_file = tmp_path / "items.json"
    items_file.write_text(json.dumps(items))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", EIGHT_DEVICES, folders["llama"][0], str(items_file)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("SCORES"))[7:])
    assert judge.mesh is None or jax.device_count() > 1
    assert max_diff(sharded, judge.scores(items)) < 1e-5


# ---------------------------------------------------------------- (d) clear errors


def test_folder_without_score_head_is_refused(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2)).save_pretrained(str(tmp_path))
    with pytest.raises(
        ValueError, match=r"model\.safetensors.*has no tensor 'score\.weight'.*LlamaForSequenceClassification"
    ):
        load_reward_model(str(tmp_path))


def test_config_errors_name_the_field(folders):
    with pytest.raises(ValueError, match=r"config\.eval\.reward_model\.path is empty"):
        RewardModelJudge.from_config(judge_cfg(""))
    with pytest.raises(ValueError, match=r"config\.eval\.reward_model\.chat_template='nope'"):
        RewardModelJudge.from_config(judge_cfg(folders["llama"][0], chat_template="nope"))
    with pytest.raises(ValueError, match=r"num_labels=2"):
        RewardModelJudge.from_config(judge_cfg(folders["gpt_neox"][0]))


def test_online_rounds_label_samples_with_the_reward_models_scores(folders, judge, tmp_path):
    """kto_jax/online/phases.py labels a round's samples with this judge, chunk by chunk: each
    sample's reward is its score, thresholded at the median for binary feedback and paired
    best-against-worst per prompt for pairwise feedback (HALOs main's label.py with a reward model)."""
    from kto_jax.online import phases
    from kto_jax.sweeps import load_config

    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "online.py"))
    config.online.update(judge="reward_model", samples_per_prompt=2, chunk_prompts=1)
    config.eval.reward_model.update(judge_cfg(folders["llama"][0]).to_dict())
    rows = [
        {"prompt_id": p, "sample_id": k, "prompt": phases.messages(turns), "output": answer, "type": "sample"}
        for p, (turns, first, second) in enumerate(ITEMS[:3])
        for k, answer in enumerate((first, second))
    ]
    judged = phases.label(config, str(tmp_path), 0, rows)
    scores = judge.scores([(phases.turns_of(r), r["output"]) for r in rows])
    # (batches of one chunk pad to other lengths than one batch of all six: fp32 sums in another order)
    assert [j["reward"] for j in judged] == pytest.approx(scores, abs=TOL) and not any("desirable" in j for j in judged)
    scores = [j["reward"] for j in judged]
    assert len(os.listdir(tmp_path / "round_0" / "labelling")) == 3  # one chunk per prompt
    binary, counts = phases.feedback(config, 0, rows, judged)
    assert [r["label"] for r in binary] == [int(s >= np.median(scores)) for s in scores] and "sampled" not in counts
    config.online.feedback = "pairwise"
    pairs, _ = phases.feedback(config, 0, rows, judged)
    best = [
        (
            rows[2 * p + int(scores[2 * p + 1] > scores[2 * p])]["output"],
            rows[2 * p + int(scores[2 * p + 1] <= scores[2 * p])]["output"],
        )
        for p in range(3)
        if scores[2 * p] != scores[2 * p + 1]
    ]
    assert [(r["output_A"], r["output_B"]) for r in pairs] == best
