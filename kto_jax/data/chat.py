"""Chat templates: the built-ins (``halos``, ``hh``, ``plain``) and a model's own Jinja template.

A prompt is ``turns``: ``(role, content)`` pairs, roles "system", "user", "assistant"; the
completion is the reply that follows. A ``ChatTemplate`` renders

* ``prompt(turns)``: the prompt text, ending where the completion starts;
* ``completion(turns, completion)``: the text that follows ``prompt(turns)`` for that reply,
  so that ``prompt + completion`` is the rendered conversation (the built-ins return the
  completion unchanged).

``JinjaChatTemplate`` renders a Hugging Face chat template exactly as transformers'
``apply_chat_template(..., tokenize=False)`` does (same jinja2 sandbox, filters and globals;
no transformers import). transformers then tokenizes that text with
``add_special_tokens=False``, so the BOS is whatever the template writes: when the rendering
starts with ``bos_token`` (``renders_bos``) the template's ``prompt``/``completion`` strip it
and the caller puts the BOS id first instead (``bos_id_for``), which keeps the BOS first
through prompt truncation. ``[bos_id] + tokenizer.encode(prompt)`` then equals
transformers' ids. ``completion`` ends before the template's last ``eos_token`` (dropping the
EOS text and what follows it, e.g. a "\\n"): the loader appends the EOS id itself.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import ClassVar, Protocol

from kto_jax.errors import InputError

Turns = Sequence[tuple[str, str]]

# ---------------------------------------------------------------- interface


class ChatTemplate(Protocol):
    name: str
    renders_bos: bool  # the rendered text starts with bos_token (then stripped from prompt())
    bos_token: str | None

    def prompt(self, turns: Turns) -> str: ...

    def completion(self, turns: Turns, completion: str, prompt_text: str | None = None) -> str: ...


# ---------------------------------------------------------------- built-ins


def _halos(turns) -> str:
    """The KTO paper's template: "\\n<|user|>\\n{content}" / "\\n<|assistant|>\\n{content}" (and
    "\\n<|system|>\\n{content}"), then the assistant marker that the completion follows."""
    return "".join(f"\n<|{role}|>\n{content}" for role, content in turns) + "\n<|assistant|>\n"


def _hh(turns) -> str:
    """Anthropic HH's own format: "\\n\\nHuman: ..." / "\\n\\nAssistant: ...", ending "\\n\\nAssistant:".

    HH has no system turn: a system turn's text is written as is, where it stands (first, in
    practice), and the dialogue follows it.
    """
    names = {"user": "\n\nHuman: ", "assistant": "\n\nAssistant: ", "system": ""}
    return "".join(f"{names[role]}{content}" for role, content in turns) + "\n\nAssistant:"


def _plain(turns) -> str:
    """The turns' contents (system ones included) joined by newlines, nothing added (the synthetic task)."""
    return "\n".join(content for _, content in turns)


class BuiltinTemplate:
    """A built-in template: a function of the turns; the completion is appended unchanged."""

    renders_bos = False
    bos_token = None

    def __init__(self, name: str, render):
        self.name, self._render = name, render

    def prompt(self, turns: Turns) -> str:
        return self._render(turns)

    def completion(self, turns: Turns, completion: str, prompt_text: str | None = None) -> str:
        return completion

    def __repr__(self):
        return f"BuiltinTemplate({self.name!r})"


BUILTIN_TEMPLATES = {
    t.name: t for t in (BuiltinTemplate("halos", _halos), BuiltinTemplate("hh", _hh), BuiltinTemplate("plain", _plain))
}
CHAT_TEMPLATE_NAMES = (*BUILTIN_TEMPLATES, "tokenizer")

# ---------------------------------------------------------------- Jinja (transformers' rendering)


# the variables transformers' apply_chat_template passes (tokenizer.special_tokens_map)
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _TemplateError(Exception):
    """``raise_exception(message)`` in a template."""


def _environment():
    """transformers' ``_cached_compile_jinja_template`` environment (chat_template_utils.py)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body (transformers tracks the
        assistant spans there; nothing here needs them)."""

        tags: ClassVar[set[str]] = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace ({name!r})"
                )

    def raise_exception(message):
        raise _TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(), namespace=TemplateNamespace
    )
    return env


def _messages(turns: Turns) -> list[dict]:
    return [{"role": role, "content": content} for role, content in turns]


def _divergence(a: str, b: str, width: int = 40) -> str:
    i = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    lo = max(i - width, 0)
    return f"at character {i}: prompt ...{a[lo : i + width]!r} vs prompt + completion ...{b[lo : i + width]!r}"


class JinjaChatTemplate:
    """A Hugging Face Jinja chat template, rendered as transformers' ``apply_chat_template``.

    ``bos_token``/``eos_token`` and ``special_tokens`` (``pad_token``, ``unk_token``, ...) are
    the template's variables, as transformers passes the tokenizer's special tokens; the
    template is compiled once, here.
    """

    def __init__(
        self,
        source: str,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        special_tokens: dict | None = None,
        name: str = "jinja",
    ):
        import jinja2

        self.name, self.source = name, source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.special_tokens.update(
            {k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token)) if v is not None}
        )
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise InputError(f"chat template {name!r} does not compile: {e}") from e
        self._renders_bos = None

    @classmethod
    def from_folder(cls, path: str) -> JinjaChatTemplate:
        """The template of a model/tokenizer folder: ``chat_template.jinja``, else
        tokenizer_config.json's ``chat_template`` (a string, or a list of ``{"name", "template"}``
        of which "default" is used); special tokens from tokenizer_config.json."""
        config_file, jinja_file = os.path.join(path, "tokenizer_config.json"), os.path.join(path, "chat_template.jinja")
        config = {}
        if os.path.exists(config_file):
            with open(config_file, encoding="utf-8") as f:
                config = json.load(f)
        source = None
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                source = f.read()
        else:
            source = config.get("chat_template")
            if isinstance(source, list):
                source = {t.get("name"): t.get("template") for t in source}.get("default")
        if not source:
            raise InputError(
                f"{path!r} has no chat template: looked for {jinja_file!r} and a 'chat_template' (or a 'default' "
                f"one) in {config_file!r}. Set config.data.chat_template='halos' (or another built-in: "
                f"{', '.join(BUILTIN_TEMPLATES)}), or point to a model folder whose tokenizer has a template."
            )
        named = config.get("extra_special_tokens")  # a dict of named tokens (multimodal) joins the standard ones
        named = {**(named if isinstance(named, dict) else {}), **{k: config.get(k) for k in SPECIAL_TOKEN_NAMES}}
        special = {k: _token_str(v) for k, v in named.items()}
        special = {k: v for k, v in special.items() if isinstance(v, str)}
        return cls(
            source,
            bos_token=special.pop("bos_token", None),
            eos_token=special.pop("eos_token", None),
            special_tokens=special,
            name=f"tokenizer template of {path}",
        )

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        """transformers' rendering of ``messages`` (BOS included, as the template writes it)."""
        import jinja2

        try:
            return self._template.render(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except _TemplateError as e:
            raise InputError(f"chat template {self.name!r} raised an exception: {e}") from e
        except jinja2.TemplateError as e:
            raise InputError(f"chat template {self.name!r} failed to render: {e}") from e

    def _strip_bos(self, text: str) -> str:
        if self.bos_token and text.startswith(self.bos_token):
            return text[len(self.bos_token) :]
        return text

    @property
    def renders_bos(self) -> bool:
        """Whether the rendering starts with ``bos_token`` (probed on a one-user-turn conversation)."""
        if self._renders_bos is None:
            probe = self.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
            self._renders_bos = bool(self.bos_token) and probe.startswith(self.bos_token)
        return self._renders_bos

    def prompt(self, turns: Turns) -> str:
        """The conversation with the generation prompt, without a leading BOS."""
        return self._strip_bos(self.render(_messages(turns), add_generation_prompt=True))

    def completion(self, turns: Turns, completion: str, prompt_text: str | None = None) -> str:
        """What the conversation with ``completion`` as a last assistant turn adds to the prompt,
        cut before the last ``eos_token`` (the loader appends the EOS id)."""
        prompt = self.prompt(turns) if prompt_text is None else prompt_text
        full = self._strip_bos(
            self.render(_messages(turns) + [{"role": "assistant", "content": completion}], add_generation_prompt=False)
        )
        if not full.startswith(prompt):
            raise InputError(
                f"chat template {self.name!r} does not render the prompt as a prefix of prompt + completion, so the "
                f"text cannot be split into prompt and completion ({_divergence(prompt, full)}); set "
                f"config.data.chat_template to a built-in ({', '.join(BUILTIN_TEMPLATES)}) or fix the template"
            )
        rest = full[len(prompt) :]
        cut = rest.rfind(self.eos_token) if self.eos_token else -1
        return rest[:cut] if cut >= 0 else rest

    def __repr__(self):
        return f"JinjaChatTemplate(name={self.name!r})"


def _token_str(value):
    if isinstance(value, dict):  # {"content": "</s>", ...}
        return value.get("content")
    return value


# ---------------------------------------------------------------- lookup


def get_chat_template(name: str, folder: str | None = None) -> ChatTemplate:
    """``"halos"`` | ``"hh"`` | ``"plain"`` | ``"tokenizer"`` (``folder``'s own Jinja template)."""
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]
    if name == "tokenizer":
        if folder is None:
            raise InputError(
                "config.data.chat_template='tokenizer' needs a model/tokenizer folder with a chat template: "
                "set config.data.tokenizer, or config.model.name to a Hugging Face model folder"
            )
        return JinjaChatTemplate.from_folder(folder)
    raise InputError(
        f"unknown chat template {name!r} (config.data.chat_template); known: {', '.join(CHAT_TEMPLATE_NAMES)}"
    )


def render_prompt(turns: Turns, template: str | ChatTemplate) -> str:
    """``turns`` rendered as a prompt by a template (a built-in's name or a ``ChatTemplate``)."""
    return (get_chat_template(template) if isinstance(template, str) else template).prompt(turns)


def bos_id_for(template: ChatTemplate, tokenizer) -> int | None:
    """The ``bos_id`` a tokenizer must have with ``template``: a Jinja template's BOS is the one
    it renders (``tokenizer.token_id(bos_token)`` when ``renders_bos``, else None); a built-in
    keeps the tokenizer's own (``tokenizer.bos_id``)."""
    if isinstance(template, JinjaChatTemplate):
        return tokenizer.token_id(template.bos_token) if template.renders_bos else None
    return tokenizer.bos_id
