"""The demo's synthetic chat tasks: small enough to learn in minutes on CPU, checkable by exact match.

- add:     "What is 37 + 48?" -> "85"
- reverse: "Reverse the words: apple river stone" -> "stone river apple" (words from WORDS only)
- name:    multi-turn; the user gives a name, asks something else, then asks for the name back
- number:  multi-turn; the user gives a number to remember, then asks for it back
The answers of the multi-turn tasks depend on an earlier turn.

Preference pairs (`make_preference_pairs`, for `make demo-dpo`) take a conversation's last answer as
the chosen reply and a near miss of it as the rejected one: a sum off by a little, the words reversed
but for one swapped pair, another name, the number with one digit changed.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from chatkit.conversation import Conversation, Message, Preference

WORDS = (
    "apple river stone cloud green tiger music paper light table window garden yellow silver ocean "
    "forest candle rabbit orange winter summer bridge castle dragon engine flower guitar hammer island "
    "jacket kettle lemon mirror needle pencil rocket shadow tomato violin wallet basket button camera "
    "circle desert finger ladder marble pillow planet puzzle saddle socket spider sugar tunnel"
).split()
NAMES = (
    "Alice Bob Carol David Emma Frank Grace Henry Irene Jack Karen Liam Maria Noah Olivia Peter Quinn "
    "Rosa Sam Tina Umar Vera Walter Xena Yusuf Zoe Aaron Bella Carlos Diana Ethan Fiona George Hannah "
    "Ivan Julia Kevin Laura Martin Nina Oscar Paula Ravi Sofia Tom Ursula Victor Wendy Yara Zack"
).split()


def _add(rng: random.Random) -> list[Message]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return [Message("user", f"What is {a} + {b}?"), Message("assistant", str(a + b))]


def _reverse(rng: random.Random) -> list[Message]:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return [
        Message("user", "Reverse the words: " + " ".join(words)),
        Message("assistant", " ".join(reversed(words))),
    ]


def _name(rng: random.Random) -> list[Message]:
    name = rng.choice(NAMES)
    return [
        Message("user", f"Hi, my name is {name}."),
        Message("assistant", f"Nice to meet you, {name}!"),
        *_reverse(rng),
        Message("user", "What is my name?"),
        Message("assistant", name),
    ]


def _number(rng: random.Random) -> list[Message]:
    n = str(rng.randint(100, 9999))
    return [
        Message("user", f"Please remember the number {n}."),
        Message("assistant", "OK, I will remember it."),
        *_add(rng),
        Message("user", "Which number did I ask you to remember?"),
        Message("assistant", n),
    ]


TASKS: dict[str, Callable[[random.Random], list[Message]]] = {
    "add": _add,
    "reverse": _reverse,
    "name": _name,
    "number": _number,
}


def _key(msgs: list[Message]) -> tuple[str, ...]:
    return tuple(m.content for m in msgs if m.role == "user")


def make_splits(n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Conversation], list[Conversation]]:
    """Train and held-out conversations, tasks in equal shares; no held-out prompt occurs in train."""
    rng = random.Random(seed)
    names = list(TASKS)
    heldout, seen = [], set()
    for i in range(n_heldout):
        msgs = TASKS[names[i % len(names)]](rng)
        seen.add(_key(msgs))
        heldout.append(Conversation(tuple(msgs), f"synthetic/{names[i % len(names)]}"))
    train: list[Conversation] = []
    while len(train) < n_train:
        task = names[len(train) % len(names)]
        msgs = TASKS[task](rng)
        if _key(msgs) not in seen:
            train.append(Conversation(tuple(msgs), f"synthetic/{task}"))
    return train, heldout


def near_miss(answer: str, rng: random.Random) -> str:
    """A wrong answer close to `answer` (never equal to it)."""
    if answer in NAMES:
        return rng.choice([n for n in NAMES if n != answer])
    if answer.isdigit():
        if len(answer) >= 3:  # a remembered number: one digit changed
            i = rng.randrange(len(answer))
            digit = rng.choice([d for d in "0123456789" if d != answer[i] and (i or d != "0")])
            return answer[:i] + digit + answer[i + 1 :]
        return str(max(0, int(answer) + rng.choice([-10, -2, -1, 1, 2, 10])) or int(answer) + 1)
    words = answer.split()
    if len(words) > 1:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
        return " ".join(words)
    return answer + "s"


def to_preference(conv: Conversation, rng: random.Random) -> Preference:
    """The conversation up to its last answer, that answer (chosen) and a near miss (rejected)."""
    *prompt, answer = conv.messages
    rejected = near_miss(answer.content, rng)
    if rejected == answer.content:
        raise ValueError(f"no near miss of {answer.content!r}")
    return Preference(tuple(prompt), answer, Message("assistant", rejected), conv.source)


def make_preference_pairs(
    n_train: int, heldout: list[Conversation], seed: int = 1
) -> tuple[list[Preference], list[Preference]]:
    """Train pairs from fresh conversations (none with a held-out prompt) and one pair per held-out
    conversation, so held-out pairs ask what neither fine-tuning saw."""
    rng = random.Random(seed)
    seen = {_key(list(c.messages)) for c in heldout}
    names = list(TASKS)
    train: list[Preference] = []
    while len(train) < n_train:
        task = names[len(train) % len(names)]
        msgs = TASKS[task](rng)
        if _key(msgs) not in seen:
            train.append(to_preference(Conversation(tuple(msgs), f"synthetic/{task}"), rng))
    return train, [to_preference(c, rng) for c in heldout]
