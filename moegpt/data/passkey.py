"""Passkey retrieval (Mohtashami & Jaggi, 2023, as the position-interpolation and YaRN papers use it):
a five-digit number hidden at some depth of filler text, asked for at the end.

A conversation's user turn is the text; the assistant's reply is "The pass key is N.". Lengths count the
tokens of the whole rendered conversation, so a length-L example fills L tokens of context. The
generator makes the training set of the context-extension fine-tune (lengths and depths drawn
uniformly up to a row) and the evaluation grid (lengths x depths, a number per example).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from moegpt.data.sft import Conversation, ConversationSet

# The papers' wording, except that "is" comes once, just before the number (their filler's "The grass
# is green." and "N is the pass key." give a small model several places to copy from after "is").
INTRO = ("There's an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and remember it: I will ask you about it.")
FILLER = " The grass grows green. The sky turns blue. The sun shines yellow. Here we go. There and back again."
QUESTION = " What's the pass key?"

CountTokens = Callable[[Conversation], int]  # tokens of a rendered conversation


def passkey_conversation(key: int, repeats: int, depth: float) -> Conversation:
    """The key sentence after ``round(depth * repeats)`` of the ``repeats`` filler sentences."""
    before = round(depth * repeats)
    text = (INTRO + FILLER * before + f" The pass key is {key}. Remember it."
            + FILLER * (repeats - before) + QUESTION)
    return ({"role": "user", "content": text}, {"role": "assistant", "content": answer(key)})


def answer(key: int) -> str:
    """The reply, in the words of the key sentence (the number's tokens are the ones it was given in)."""
    return f"The pass key is {key}."


class Lengths:
    """How many filler sentences make a conversation of a given token length (the tokenizer's
    count is affine in the repeats, measured at two points and checked)."""

    def __init__(self, count_tokens: CountTokens):
        self.count = count_tokens
        self.base = count_tokens(passkey_conversation(12345, 0, 0.5))
        self.per_repeat = (count_tokens(passkey_conversation(12345, 20, 0.5)) - self.base) / 20

    def repeats_for(self, length: int) -> int:
        """The most filler sentences whose conversation stays within ``length`` tokens (0 if none)."""
        r = max(0, int((length - self.base) / self.per_repeat))
        while r > 0 and self.count(passkey_conversation(99999, r, 0.5)) > length:
            r -= 1
        return r

    @property
    def shortest(self) -> int:
        return self.base


def passkey_source(epochs: float, count_tokens: CountTokens, max_tokens: int, *, min_tokens: int | None = None,
                   n_train: int = 4000, n_val: int = 200, seed: int = 0) -> ConversationSet:
    """Conversations whose lengths run uniformly from the shortest (or from about ``min_tokens``) to
    ``max_tokens`` (a row), at uniform depths; the held-out set is drawn by another seed (its keys
    are fresh draws)."""
    lengths = Lengths(count_tokens)
    most = lengths.repeats_for(max_tokens)
    if most < 1:
        raise ValueError(f"a passkey conversation needs more than {lengths.shortest} tokens; a row holds {max_tokens}")
    least = 0 if min_tokens is None else min(lengths.repeats_for(min_tokens), most)

    def draw(n: int, salt: int) -> tuple[Conversation, ...]:
        rng = random.Random(f"passkey-{seed}-{salt}")
        return tuple(passkey_conversation(rng.randrange(10_000, 100_000), rng.randint(least, most), rng.random())
                     for _ in range(n))

    return ConversationSet(name="passkey", epochs=epochs, train=draw(n_train, 0), val=draw(n_val, 1),
                           val_tasks=("passkey",) * n_val)


def passkey_grid(count_tokens: CountTokens, lengths: Sequence[int], depths: Sequence[float], per_cell: int,
                 seed: int = 1234) -> tuple[list[Conversation], list[str]]:
    """``per_cell`` conversations at each (length, depth), each within its length; their task names
    are "L@D" (e.g. "512@0.50")."""
    sizes = Lengths(count_tokens)
    rng = random.Random(f"passkey-grid-{seed}")
    convs, tasks = [], []
    for length in lengths:
        repeats = sizes.repeats_for(length)
        for depth in depths:
            for _ in range(per_cell):
                convs.append(passkey_conversation(rng.randrange(10_000, 100_000), repeats, depth))
                tasks.append(f"{length}@{depth:.2f}")
    return convs, tasks
