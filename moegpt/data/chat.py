"""Chat messages -> prompt text, with the chat template stored with the tokenizer; and a whole
conversation -> token ids with the mask of the assistant's tokens, for fine-tuning.

The template is a Jinja string (``chat_template`` in tokenizer_config.json, as Hugging Face stores
it), rendered the way transformers' ``apply_chat_template`` renders it: a sandboxed environment with
trim_blocks/lstrip_blocks, ``messages``, ``add_generation_prompt``, the special tokens and a
``raise_exception`` helper. A tokenizer without one gets our default (ChatML with our specials) when
its vocabulary has those specials; ``moegpt serve --chat-template FILE`` overrides either, as vLLM's flag.

The assistant mask comes from the rendering itself, not from markers in the template (transformers'
``{% generation %}``, which most templates lack, and whose absence gives an all-zero mask): the
conversation is rendered up to each assistant turn with the generation prompt (what the server
sends the model before that turn) and through the turn; the difference is what the model must
write. The whole rendering is tokenized once, as the server tokenizes a prompt, and a token is the
assistant's when it starts inside one of its replies. A template whose renderings do not extend one another, or that leaves an assistant turn
empty, is an error naming the turn.
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

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {e}") from None

    def pieces(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The conversation's text in order as (text, written by the assistant) pieces: joined, the
        whole rendering (without a generation prompt)."""
        out: list[tuple[str, bool]] = []
        done = ""  # the rendering so far
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            through = self.render(messages[:i + 1], add_generation_prompt=False)
            if not prompt.startswith(done) or not through.startswith(prompt):
                raise TemplateError(f"the chat template's renderings do not extend one another at message {i}: "
                                    "cannot tell which tokens the assistant writes")
            reply = through[len(prompt):]
            if not reply:
                raise TemplateError(f"the chat template renders assistant message {i} as nothing: no tokens to learn")
            out += [(prompt[len(done):], False), (reply, True)]
            done = through
        if not out:
            raise TemplateError("the conversation has no assistant message: no tokens to learn")
        rest = self.render(messages, add_generation_prompt=False)
        if not rest.startswith(done):
            raise TemplateError("the chat template's renderings do not extend one another at the end")
        out.append((rest[len(done):], False))
        return [(text, mine) for text, mine in out if text]

    def tokens(self, tokenizer: Tokenizer, messages: list[dict[str, str]]) -> tuple[list[int], list[bool]]:
        """The conversation's token ids and, for each, whether the assistant wrote it (the loss's
        tokens): the whole rendering tokenized once, as the server tokenizes a prompt (no added
        specials; tokenizing piece by piece would, e.g., give a sentencepiece tokenizer a word-start
        mark at every piece), each token the assistant's when it starts inside one of its replies."""
        pieces = self.pieces(messages)
        spans, at = [], 0
        for text, mine in pieces:
            if mine:
                spans.append((at, at + len(text)))
            at += len(text)
        ids, offsets = tokenizer.encode_with_offsets("".join(text for text, _ in pieces))
        return ids, [any(a <= start < b for a, b in spans) for start, _ in offsets]


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
