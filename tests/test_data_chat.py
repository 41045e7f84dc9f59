"""Chat templates (kto_jax/data/chat.py): a model's Jinja template rendered and tokenized
token-for-token as transformers' ``apply_chat_template`` does (SmolLM2-135M-Instruct's own
template, and Llama-3- and Mistral-style ones run with SmolLM2's tokenizer), its errors, and
the built-ins."""

from __future__ import annotations

import datetime
import json

import jinja2
import pytest

from kto_jax.data.chat import (
    CHAT_TEMPLATE_NAMES,
    JinjaChatTemplate,
    bos_id_for,
    get_chat_template,
    render_prompt,
)
from kto_jax.data.tokenize import ByteTokenizer, HFTokenizer, encode_pair, encode_prompt
from tests.smollm2 import smollm2_dir

BOS, EOS = "<|im_start|>", "<|im_end|>"  # SmolLM2's bos_token/eos_token (both in its vocabulary)

# Llama-3's template, with the EOS variable for "<|eot_id|>" (SmolLM2's vocabulary lacks Llama's tokens)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + eos_token %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Mistral-Instruct-v0.1's: alternating user/assistant roles only, raise_exception otherwise
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token + ' ' }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

CONVERSATIONS = {
    "single": ((("user", "What is 2+2?"),), "It is 4."),
    "multi": (
        (("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke.")),
        " Why did the chicken cross the road?\nTo get to the other side.",
    ),
    "system": ((("system", "You are terse."), ("user", "Name a colour.")), "Blue."),
}


@pytest.fixture(scope="module")
def path():
    return smollm2_dir()


@pytest.fixture(scope="module")
def hf_tok(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _ids(out) -> list[int]:
    """transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list."""
    return list(out["input_ids"] if not isinstance(out, list) else out)


def _messages(turns):
    return [{"role": r, "content": c} for r, c in turns]


def _template(name, path):
    if name == "smollm2":
        return JinjaChatTemplate.from_folder(path), None
    source = {"llama3": LLAMA3, "mistral": MISTRAL}[name]
    return JinjaChatTemplate(source, bos_token=BOS, eos_token=EOS, special_tokens={"pad_token": EOS}, name=name), source


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", ["smollm2", "llama3", "mistral"])
def test_ids_match_transformers(path, hf_tok, name, conversation):
    turns, completion = CONVERSATIONS[conversation]
    if name == "mistral" and conversation == "system":
        pytest.skip("Mistral's template rejects system turns (test_raise_exception)")
    template, source = _template(name, path)
    kw = {} if source is None else {"chat_template": source}
    msgs = _messages(turns)
    full_msgs = [*msgs, {"role": "assistant", "content": completion}]
    # the text first: our rendering is transformers' (BOS included, before we strip it)
    assert template.render(msgs, True) == hf_tok.apply_chat_template(
        msgs, add_generation_prompt=True, tokenize=False, **kw
    )
    assert template.render(full_msgs, False) == hf_tok.apply_chat_template(full_msgs, tokenize=False, **kw)
    ref_prompt = _ids(hf_tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, **kw))
    ref_full = _ids(hf_tok.apply_chat_template(full_msgs, tokenize=True, **kw))

    tok = HFTokenizer(path)
    tok.bos_id = bos_id_for(template, tok)
    assert template.renders_bos and tok.bos_id == tok.token_id(BOS)  # all three write the BOS
    prompt_text = template.prompt(turns)
    assert not prompt_text.startswith(BOS)
    assert encode_prompt(tok, prompt_text) == ref_prompt
    completion_text = template.completion(turns, completion, prompt_text)
    assert completion_text == template.completion(turns, completion)  # prompt_text only saves a render
    assert EOS not in completion_text
    prompt_ids, completion_ids = encode_pair(tok, prompt_text, completion_text)
    # the joint text's prompt part: the prompt's own ids, or all but the last when that one merges
    # with the completion's first (SmolLM2's BPE splits Llama-3's "\n\n" as "\n", "\n" before a word)
    assert prompt_ids == ref_prompt[: len(prompt_ids)] and len(prompt_ids) >= len(ref_prompt) - 1
    assert (prompt_ids == ref_prompt) == (name != "llama3")
    ours = prompt_ids + completion_ids + [tok.eos_id]
    assert ref_full[: len(ours)] == ours  # up to and including the EOS
    assert hf_tok.decode(ref_full[len(ours) :]).strip() == ""  # after it, only the template's whitespace


def test_smollm2_folder(path):
    template = get_chat_template("tokenizer", path)
    assert isinstance(template, JinjaChatTemplate) and path in template.name
    assert (template.bos_token, template.eos_token) == (BOS, EOS)
    assert template.special_tokens["pad_token"] == EOS and template.special_tokens["unk_token"] == "<|endoftext|>"
    # SmolLM2's template adds its default system prompt unless the conversation has one
    assert "SmolLM" in template.prompt((("user", "Hi"),))
    assert "SmolLM" not in template.prompt((("system", "Be brief."), ("user", "Hi")))
    assert template.prompt((("user", "Hi"),)).endswith(f"{BOS}user\nHi{EOS}\n{BOS}assistant\n")
    assert template.completion((("user", "Hi"),), "Hello!") == "Hello!"  # "<|im_end|>\n" cut off
    assert render_prompt((("user", "Hi"),), template) == template.prompt((("user", "Hi"),))


def test_raise_exception(hf_tok):
    template = JinjaChatTemplate(MISTRAL, bos_token=BOS, eos_token=EOS, name="mistral-style")
    bad = (("user", "a"), ("user", "b"))
    with pytest.raises(jinja2.TemplateError, match="must alternate"):  # transformers raises too
        hf_tok.apply_chat_template(_messages(bad), chat_template=MISTRAL, tokenize=False)
    with pytest.raises(ValueError, match=r"'mistral-style'.*Conversation roles must alternate user/assistant"):
        template.prompt(bad)
    with pytest.raises(ValueError, match="Only user and assistant roles are supported"):
        template.prompt((("user", "u"), ("system", "s")))


def test_strftime_now(hf_tok):
    source = "Today is {{ strftime_now('%Y-%m-%d') }}.{% for m in messages %} {{ m['content'] }}{% endfor %}"
    msgs = [{"role": "user", "content": "Hi"}]
    ours = JinjaChatTemplate(source).render(msgs, True)
    assert ours == f"Today is {datetime.date.today():%Y-%m-%d}. Hi"
    assert ours == hf_tok.apply_chat_template(msgs, chat_template=source, add_generation_prompt=True, tokenize=False)


def test_tojson_generation_tag_and_namespace_match_transformers(hf_tok):
    source = (
        "{{ messages | tojson }}|{{ {'b': 'é<&>\"', 'a': [1, 2.5, none, true]} | tojson(indent=2, sort_keys=True) }}|"
        "{{ bos_token | tojson }}{{ pad_token }}{{ unk_token }}\n"
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% if loop.last %}{% break %}{% endif %}"
        "{% generation %}  {{ m['role'] }}{% endgeneration %}\n{% endfor %}{{ ns.n }}{{ dict(x=1) | tojson }}"
    )
    msgs = [{"role": "user", "content": "Ünïcode <b>&"}, {"role": "assistant", "content": "ok"}]
    ours = JinjaChatTemplate(
        source, bos_token=BOS, eos_token=EOS, special_tokens={"pad_token": EOS, "unk_token": "<|endoftext|>"}
    )
    rendered = ours.render(msgs, False)
    assert rendered == hf_tok.apply_chat_template(msgs, chat_template=source, tokenize=False)
    assert json.dumps(msgs, ensure_ascii=False) in rendered and "Ünïcode <b>&" in rendered  # no HTML escaping


def test_not_prefix_consistent_fails_naming_the_template():
    source = (
        "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    )
    template = JinjaChatTemplate(source, name="shouty")
    turns = (("user", "hi"),)
    assert template.prompt(turns) == "user: hi\nASSISTANT:"
    with pytest.raises(
        ValueError, match=r"'shouty' does not render the prompt as a prefix of prompt \+ completion"
    ) as e:
        template.completion(turns, "hello")
    assert (
        "ASSISTANT:" in str(e.value)
        and "assistant: hello" in str(e.value)
        and "config.data.chat_template" in str(e.value)
    )


def test_folder_without_template(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    for make in (JinjaChatTemplate.from_folder, lambda p: get_chat_template("tokenizer", p)):
        with pytest.raises(ValueError, match="has no chat template") as e:
            make(str(tmp_path))
        msg = str(e.value)
        assert str(tmp_path) in msg and "chat_template.jinja" in msg and "tokenizer_config.json" in msg
        assert "config.data.chat_template='halos'" in msg


def test_folder_template_sources(tmp_path):
    """tokenizer_config.json: a list of named templates ("default" used), token dicts; chat_template.jinja wins."""
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "TOOLS"},
            {
                "name": "default",
                "template": "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}",
            },
        ],
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "add_bos_token": True,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    template = JinjaChatTemplate.from_folder(str(tmp_path))
    assert (template.bos_token, template.eos_token, template.renders_bos) == ("<s>", "</s>", True)
    assert template.prompt((("user", "hi"),)) == "hi</s>"
    assert template.completion((("user", "hi"),), "yo") == "yo"
    assert "add_bos_token" not in template.special_tokens
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    template = JinjaChatTemplate.from_folder(str(tmp_path))
    assert template.prompt((("user", "hi"),)) == "[hi]" and not template.renders_bos
    tok = ByteTokenizer()
    assert bos_id_for(template, tok) is None


def test_bad_template_source():
    with pytest.raises(ValueError, match="'broken' does not compile"):
        JinjaChatTemplate("{% for m in messages %}", name="broken")


def test_builtins_with_system_turn():
    turns = (("system", "Be nice."), ("user", "hi"), ("assistant", "hello"), ("user", "bye"))
    assert (
        render_prompt(turns, "halos")
        == "\n<|system|>\nBe nice.\n<|user|>\nhi\n<|assistant|>\nhello\n<|user|>\nbye\n<|assistant|>\n"
    )
    assert render_prompt(turns, "hh") == "Be nice.\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert render_prompt(turns, "plain") == "Be nice.\nhi\nhello\nbye"
    for name in ("halos", "hh", "plain"):
        template = get_chat_template(name, None)
        assert template.name == name and not template.renders_bos and template.bos_token is None
        assert template.completion(turns, " Bye!\n") == " Bye!\n"
        assert render_prompt(turns, template) == render_prompt(turns, name)
    tok = ByteTokenizer()
    tok.bos_id = 7  # a built-in keeps the tokenizer's own BOS
    assert bos_id_for(get_chat_template("halos", None), tok) == 7


def test_lookup_errors():
    assert set(CHAT_TEMPLATE_NAMES) == {"halos", "hh", "plain", "tokenizer"}
    with pytest.raises(
        ValueError, match=r"unknown chat template 'chatml' \(config.data.chat_template\).*halos, hh, plain, tokenizer"
    ):
        get_chat_template("chatml", None)
    with pytest.raises(ValueError, match=r"needs a model/tokenizer folder.*config.data.tokenizer.*config.model.name"):
        get_chat_template("tokenizer", None)
    with pytest.raises(ValueError, match="needs a model/tokenizer folder"):
        render_prompt((("user", "hi"),), "tokenizer")
