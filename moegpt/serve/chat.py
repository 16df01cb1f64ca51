"""Chat messages -> prompt text, with the chat template stored with the tokenizer.

The template is a Jinja string (``chat_template`` in tokenizer_config.json, as Hugging Face stores
it), rendered the way transformers' ``apply_chat_template`` renders it: a sandboxed environment with
trim_blocks/lstrip_blocks, ``messages``, ``add_generation_prompt``, the special tokens and a
``raise_exception`` helper. A tokenizer without one gets our default (ChatML with our specials) when
its vocabulary has those specials; ``moegpt serve --chat-template FILE`` overrides either, as vLLM's flag.
"""

from __future__ import annotations

from dataclasses import dataclass

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from moegpt.data.tokenizer import CHAT_TEMPLATE, IM_END, IM_START, Tokenizer


class TemplateError(ValueError):
    """The template refused the conversation (its raise_exception) or failed to render."""


@dataclass(frozen=True)
class ChatFormat:
    template: jinja2.Template
    bos_token: str
    eos_token: str
    stop_token_ids: frozenset[int]  # tokens that end an assistant turn (besides eos, which the engine adds)

    def render(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_token,
                                        eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {e}") from None


def _raise(message: str):
    raise TemplateError(message)


def chat_format(tokenizer: Tokenizer, template: str | None = None) -> ChatFormat | None:
    """The chat format: ``template`` (``moegpt serve --chat-template``) when given, else the tokenizer's;
    None when there is neither a template nor our chat specials."""
    source = template if template is not None else tokenizer.chat_template
    has_specials = tokenizer.token_to_id(IM_START) is not None and tokenizer.token_to_id(IM_END) is not None
    if source is None and not has_specials:
        return None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    try:
        compiled = env.from_string(source if source is not None else CHAT_TEMPLATE)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None

    def name(token_id: int | None) -> str:
        return (tokenizer.id_to_token(token_id) or "") if token_id is not None else ""

    stops = frozenset({tokenizer.token_to_id(IM_END)} if has_specials else set())
    return ChatFormat(compiled, name(tokenizer.bos_id), name(tokenizer.eos_id), stops)
