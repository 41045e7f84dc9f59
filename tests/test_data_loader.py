"""The loader: KL pairing, buckets, determinism, exact resume, disjoint per-process slices."""

import numpy as np
import pytest

from kto_jax.data.chat import render_prompt
from kto_jax.data.feedback import Paired, Unary
from kto_jax.data.loader import FeedbackLoader
from kto_jax.data.tokenize import ByteTokenizer, TokenizeConfig

TOK = ByteTokenizer()
CFG = TokenizeConfig(max_length=48, max_prompt_length=24, chat_template="plain")


def unary(n=40):
    return [Unary(f"u{i}", (("user", f"prompt {i}"),), f" answer {i}" + "!" * (i % 7), i % 3 == 0) for i in range(n)]


def loader(examples=None, **kw):
    kw.setdefault("global_batch_size", 8)
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return FeedbackLoader(unary() if examples is None else examples, TOK, CFG, bucket=16, **kw)


def decode_masked(ids, mask):
    return TOK.decode(ids[mask.astype(bool)])


@pytest.mark.parametrize("num_microbatches", [1, 2, 4])
def test_kl_sequence_is_own_prompt_with_next_completion_of_the_microbatch(num_microbatches):
    dl = loader(kl_pairing=True, num_microbatches=num_microbatches)
    batch = next(dl)
    rows = dl.global_rows(0, 0)
    for i in range(8):
        j = (i + num_microbatches) % 8  # microbatch m = rows m, m + M, ...: the next row of i's microbatch
        assert j % num_microbatches == i % num_microbatches
        prompt_i = dl.examples[rows[i]].prompt[0][1]
        completion_j = dl.examples[rows[j]].completion
        ids = batch["kl_input_ids"][i][batch["kl_attention_mask"][i].astype(bool)]
        assert TOK.decode(ids) == prompt_i + completion_j
        assert decode_masked(batch["kl_input_ids"][i], batch["kl_loss_mask"][i]) == completion_j
        assert decode_masked(batch["input_ids"][i], batch["loss_mask"][i]) == dl.examples[rows[i]].completion
        assert batch["desirable"][i] == dl.examples[rows[i]].desirable
        assert batch["kl_input_ids"][i][batch["kl_attention_mask"][i].sum() - 1] == TOK.eos_id


def test_microbatch_of_one_is_an_error():
    with pytest.raises(ValueError, match="at least 2 examples per microbatch, got 1"):
        loader(kl_pairing=True, num_microbatches=8)
    with pytest.raises(ValueError, match="not divisible by num_microbatches=3"):
        loader(num_microbatches=3)


def test_padding_to_buckets_and_shared_length():
    batch = next(loader(kl_pairing=True))
    lengths = {v.shape[1] for k, v in batch.items() if v.ndim == 2}
    assert lengths == {32}  # longest sequence ~24 tokens -> bucket 32
    assert (batch["input_ids"][batch["attention_mask"] == 0] == TOK.pad_id).all()
    assert not (batch["loss_mask"] & (batch["attention_mask"] == 0)).any()


def test_same_seed_same_batches_other_seed_other_batches():
    a = [next(loader(seed=3)) for _ in range(1)][0]
    b = next(loader(seed=3))
    c = next(loader(seed=4))
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    assert not np.array_equal(a["input_ids"], c["input_ids"])


def test_resume_at_batch_k_equals_uninterrupted_run_across_epochs():
    full = loader(kl_pairing=True, num_microbatches=2)
    reference = [next(full) for _ in range(12)]  # 5 steps per epoch: crosses two epoch boundaries
    for k in (0, 3, 5, 7):
        first = loader(kl_pairing=True, num_microbatches=2)
        for _ in range(k):
            next(first)
        state = first.state()
        resumed = loader(kl_pairing=True, num_microbatches=2)
        resumed.restore(state)
        for step in range(k, 12):
            batch = next(resumed)
            for key in batch:
                np.testing.assert_array_equal(batch[key], reference[step][key], err_msg=f"k={k} step={step} {key}")


def test_restore_with_other_data_is_an_error():
    state = loader().state()
    with pytest.raises(ValueError, match="data or config.data changed"):
        loader(examples=unary(41)).restore(state)


def test_two_processes_get_disjoint_slices_covering_the_global_batch():
    single = next(loader(kl_pairing=True, num_microbatches=2))
    parts = [next(loader(kl_pairing=True, num_microbatches=2, process_index=p, process_count=2)) for p in range(2)]
    for key in single:
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), single[key], err_msg=key)
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        loader(process_count=3, process_index=0)


def test_paired_batches():
    pairs = [Paired(f"p{i}", (("user", f"q{i}"),), f" good {i}", f" bad {i}") for i in range(16)]
    dl = loader(pairs)
    batch = next(dl)
    rows = dl.global_rows(0, 0)
    assert set(batch) == {
        f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "attention_mask", "loss_mask")
    }
    for i in range(8):
        assert decode_masked(batch["chosen_input_ids"][i], batch["chosen_loss_mask"][i]) == pairs[rows[i]].chosen
        assert decode_masked(batch["rejected_input_ids"][i], batch["rejected_loss_mask"][i]) == pairs[rows[i]].rejected


def test_examples_without_completion_tokens_are_dropped_and_counted():
    examples = unary(20) + [Unary("empty", (("user", "q"),), "", True)]
    dl = loader(examples)
    assert dl.dropped == 1 and len(dl.examples) == 20


def test_csft_control_tokens_follow_the_prompt():
    dl = loader(control_tokens=("<|good|>", "<|bad|>"))
    batch = next(dl)
    rows = dl.global_rows(0, 0)
    for i in range(8):
        first = int(np.argmax(batch["loss_mask"][i]))
        expected = TOK.token_id("<|good|>" if dl.examples[rows[i]].desirable else "<|bad|>")
        assert batch["input_ids"][i][first - 1] == expected


# ---------------------------------------------------------------- a SentencePiece tokenizer (LLaMA-style)


def sentencepiece_loader(tmp_path, examples, add_bos_token=True, **kw):
    from tests.test_data_tokenize_real import LLAMA_CONFIG, sentencepiece_folder

    tok = sentencepiece_folder(tmp_path, config={**LLAMA_CONFIG, "add_bos_token": add_bos_token})
    cfg = TokenizeConfig(max_length=64, max_prompt_length=24, chat_template="halos")
    return tok, FeedbackLoader(
        examples, tok, cfg, global_batch_size=4, bucket=16, process_index=0, process_count=1, **kw
    )


def sp_unary(n=8):
    return [Unary(f"u{i}", (("user", "Hello" + "!" * i),), "Hello world" + "!" * (i % 3), i % 2 == 0) for i in range(n)]


def rows_of(batch, group, i):
    p = f"{group}_" if group else ""
    keep = batch[f"{p}attention_mask"][i].astype(bool)
    return batch[f"{p}input_ids"][i][keep].tolist(), batch[f"{p}loss_mask"][i][keep]


def test_sentencepiece_completion_tokens_are_those_of_the_joint_text(tmp_path):
    tok, dl = sentencepiece_loader(tmp_path, sp_unary(), add_bos_token=False, kl_pairing=True)
    batch, rows = next(dl), dl.global_rows(0, 0)
    for i, r in enumerate(rows):
        text, completion = render_prompt(dl.examples[r].prompt, "halos"), dl.examples[r].completion
        ids, mask = rows_of(batch, "", i)
        assert ids == tok.encode(text + completion) + [tok.eos_id]  # separately, "Hello" would be "▁Hello"
        assert np.asarray(ids)[mask].tolist() == tok.encode(text + completion)[len(tok.encode(text)) :] + [tok.eos_id]
        partner = dl.examples[rows[(i + 1) % 4]]  # KL: own prompt, the partner's completion tokens
        kl_ids, kl_mask = rows_of(batch, "kl", i)
        assert kl_ids == tok.encode(text) + tok.encode(render_prompt(partner.prompt, "halos") + partner.completion)[
            len(tok.encode(render_prompt(partner.prompt, "halos"))) :
        ] + [tok.eos_id]
        assert kl_mask.sum() == len(kl_ids) - len(tok.encode(text))


def test_sentencepiece_bos_once_first_in_every_sequence_and_kept_by_truncation(tmp_path):
    long = [Unary("long", (("user", "Hello world " * 24),), "Hello", True)]
    tok, dl = sentencepiece_loader(tmp_path / "u", sp_unary(7) + long, kl_pairing=True)
    assert tok.bos_id == tok.token_id("<s>")
    seqs = [rows_of(batch, group, i) for batch in (next(dl), next(dl)) for group in ("", "kl") for i in range(4)]
    pairs = [Paired(f"p{i}", (("user", "Hello" + "!" * i),), "Hello world", "world") for i in range(4)]
    _, paired = sentencepiece_loader(tmp_path / "p", pairs)
    batch = next(paired)
    seqs += [rows_of(batch, group, i) for group in ("chosen", "rejected") for i in range(4)]
    for ids, mask in seqs:
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and not mask[0]
    index = [ex.id for ex in dl.examples].index("long")
    ids, mask = dl._join(dl.tokens[index][0].prompt, dl.tokens[index][0].completion)
    assert int((~mask).sum()) == 24 and ids[0] == tok.bos_id  # the prompt cut to max_prompt_length, BOS first
