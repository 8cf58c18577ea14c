from __future__ import annotations

import json
import random

import pytest

from chatkit.conversation import Message
from chatkit.templates import Segment, get_template
from chatkit.tokenization import (
    IGNORE_INDEX,
    Encoded,
    encode_conversation,
    encode_prompt,
    encode_segments,
    special_tokens,
)

OCK = get_template("openchatkit")
X = IGNORE_INDEX

# Word-level ids (tests/conftest.py WORDLEVEL_VOCAB):
# [UNK]=0 <|endoftext|>=1 <|padding|>=2 <human>:=3 <bot>:=4 \n=5 hi=6 there=7 hello=8 how=9 are=10
# you=11 fine=12 thanks=13 be=14 brief=15

TWO_TURNS = [
    Message("user", "hi there"),
    Message("assistant", "hello"),
    Message("user", "how are you"),
    Message("assistant", "fine thanks"),
]


def test_encode_two_turn_conversation_literal(wordlevel_tokenizer):
    enc = encode_conversation(wordlevel_tokenizer, OCK, TWO_TURNS)
    # "<human>: hi there\n" "<bot>:" " hello\n<human>:" " how are you\n" "<bot>:" " fine thanks<eos>" "\n":
    # the past reply's stop is the next turn's marker, trained; the last reply's is the eos
    assert enc.input_ids == [3, 6, 7, 5, 4, 8, 5, 3, 9, 10, 11, 5, 4, 12, 13, 1, 5]
    assert enc.labels == [X, X, X, X, X, 8, 5, 3, X, X, X, X, X, 12, 13, 1, X]
    assert enc.num_trained == 6


def test_encode_with_system_literal(wordlevel_tokenizer):
    msgs = [Message("system", "be brief"), *TWO_TURNS[:2]]
    enc = encode_conversation(wordlevel_tokenizer, OCK, msgs)
    assert enc.input_ids == [14, 15, 5, 3, 6, 7, 5, 4, 8, 1, 5]
    assert enc.labels == [X, X, X, X, X, X, X, X, 8, 1, X]
    assert enc.num_trained == 2


def test_stop_trained_at_end_of_each_assistant_turn_and_separator_not(wordlevel_tokenizer):
    enc = encode_conversation(wordlevel_tokenizer, OCK, TWO_TURNS)
    eos_id = wordlevel_tokenizer.eos_token_id
    eos_positions = [i for i, t in enumerate(enc.input_ids) if t == eos_id]
    assert eos_positions == [15]  # the final reply's; the first reply stops with "\n<human>:"
    assert enc.labels[15] == eos_id
    assert enc.labels[6:8] == [5, 3]  # "\n" "<human>:" after the first reply, trained
    # the "\n" separator that follows the eos is never trained
    assert enc.input_ids[16] == 5 and enc.labels[16] == IGNORE_INDEX
    assert [i for i, lab in enumerate(enc.labels) if lab == eos_id] == eos_positions


def test_train_overrides(wordlevel_tokenizer):
    msgs = [Message("user", "hi", train=True), Message("assistant", "hello", train=False)]
    enc = encode_conversation(wordlevel_tokenizer, OCK, msgs)
    assert enc.input_ids == [3, 6, 5, 4, 8, 1, 5]
    assert enc.labels == [3, 6, 5, X, X, X, X]
    assert enc.num_trained == 3


def test_labels_same_length_and_trained_labels_equal_ids(wordlevel_tokenizer):
    msgs = [Message("system", "be brief"), *TWO_TURNS, Message("user", "you", train=True)]
    enc = encode_conversation(wordlevel_tokenizer, OCK, msgs)
    assert len(enc.labels) == len(enc.input_ids)
    for tok_id, lab in zip(enc.input_ids, enc.labels, strict=True):
        assert lab in (IGNORE_INDEX, tok_id)


def test_encode_prompt_literal_and_matches_conversation(wordlevel_tokenizer):
    tok = wordlevel_tokenizer
    assert encode_prompt(tok, OCK, [Message("user", "hi there")]) == [3, 6, 7, 5, 4]
    history = TWO_TURNS[:3]
    prompt = encode_prompt(tok, OCK, history)
    assert prompt == [3, 6, 7, 5, 4, 8, 5, 3, 9, 10, 11, 5, 4]
    assert prompt[-1:] == [4]  # ids of "<bot>:"
    assert prompt == encode_conversation(tok, OCK, history).input_ids + [4]
    # also after a finished assistant turn
    assert encode_prompt(tok, OCK, TWO_TURNS) == encode_conversation(tok, OCK, TWO_TURNS).input_ids + [4]


def test_num_trained():
    assert Encoded([1, 2, 3], [X, X, X]).num_trained == 0
    assert Encoded([1, 2, 3], [1, X, 3]).num_trained == 2
    assert Encoded([], []).num_trained == 0
    # a label equal to 0 (e.g. token id 0) still counts as trained
    assert Encoded([0, 5], [0, 5]).num_trained == 2


def test_encode_segments(wordlevel_tokenizer):
    enc = encode_segments(
        wordlevel_tokenizer, [Segment("hi there\n", False), Segment("hello<|endoftext|>", True)]
    )
    assert enc.input_ids == [6, 7, 5, 8, 1]
    assert enc.labels == [X, X, X, 8, 1]


def test_token_overlapping_a_trained_segment_is_trained(neox_tokenizer):
    # "ĊĊ" straddles the end of the trained reply and the untrained separator; "Ġ" + "42": the head's
    # space alone; transformers' assistant mask marks every token overlapping the generation region
    segs = [Segment(":", False), Segment(" 42\n", True), Segment("\n", False)]
    enc = encode_segments(neox_tokenizer, segs)
    assert neox_tokenizer.convert_ids_to_tokens(enc.input_ids) == [":", "Ġ42", "ĊĊ"]
    assert enc.labels == [X, *enc.input_ids[1:]]


def test_special_tokens(wordlevel_tokenizer, make_wordlevel_tokenizer):
    assert special_tokens(wordlevel_tokenizer) == ("<|endoftext|>", "")
    no_eos = make_wordlevel_tokenizer(eos_token=None)
    assert no_eos.eos_token is None
    with pytest.raises(ValueError, match="eos"):
        special_tokens(no_eos)
    with pytest.raises(ValueError, match="eos"):
        encode_conversation(no_eos, OCK, TWO_TURNS)
    with pytest.raises(ValueError, match="eos"):
        encode_prompt(no_eos, OCK, TWO_TURNS[:1])


def test_special_tokens_with_bos(neox_tokenizer):
    assert special_tokens(neox_tokenizer) == ("<|endoftext|>", "<|endoftext|>")


# --- the real GPT-NeoX-20B tokenizer --------------------------------------------------------------


def _alpaca_conversations(shared_data, n: int, seed: int) -> list[list[Message]]:
    file = shared_data / "alpaca_en_demo.json"
    if not file.is_file():
        pytest.skip(f"{file} not found")
    rows = json.loads(file.read_text(encoding="utf-8"))
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        msgs = []
        if rng.random() < 0.3:
            msgs.append(Message("system", "You are a helpful assistant."))
        for row in rng.sample(rows, rng.randint(1, 3)):
            user = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
            msgs += [Message("user", user), Message("assistant", row["output"])]
        convs.append(msgs)
    return convs


def test_segmentwise_tokens_equal_whole_string_tokens_alpaca(neox_tokenizer, shared_data):
    tok = neox_tokenizer
    eos, bos = special_tokens(tok)
    convs = _alpaca_conversations(shared_data, n=50, seed=1234)
    assert len(convs) == 50
    total_trained = 0
    for msgs in convs:
        enc = encode_conversation(tok, OCK, msgs)
        whole = tok.encode(OCK.render(msgs, eos, bos), add_special_tokens=False)
        assert enc.input_ids == whole
        assert enc.labels.count(tok.eos_token_id) == (msgs[-1].role == "assistant")  # the last reply's
        # one "<human>:" per user turn (a past reply ends with the next one's, trained)
        assert OCK.render(msgs, eos, bos).count("<human>:") == sum(m.role == "user" for m in msgs)
        total_trained += enc.num_trained
        # the inference prompt for the history before the last reply
        history = msgs[:-1]
        prompt = encode_prompt(tok, OCK, history)
        assert prompt == tok.encode(
            OCK.render(history, eos, bos, add_generation_prompt=True), add_special_tokens=False
        )
    assert total_trained > 1000


def test_neox_known_ids(neox_tokenizer):
    enc = encode_conversation(neox_tokenizer, OCK, [Message("user", "hi"), Message("assistant", "yo")])
    # <, human, >:, Ġhi, Ċ | <, bot, >: | Ġyo, <|endoftext|> | Ċ
    assert enc.input_ids == [29, 13961, 32056, 14260, 187, 29, 12042, 32056, 26352, 0, 187]
    assert enc.labels == [X, X, X, X, X, X, X, X, 26352, 0, X]


@pytest.mark.parametrize(
    "msgs",
    [
        [Message("user", "hi\n"), Message("assistant", "yo")],
        [Message("user", "hi "), Message("assistant", "yo")],
        [Message("system", "Be brief.\n"), Message("user", "hi"), Message("assistant", "yo")],
    ],
    ids=["user-trailing-newline", "user-trailing-space", "system-trailing-newline"],
)
@pytest.mark.parametrize("which", ["local", "neox"])
def test_training_tokens_equal_whole_string_with_trailing_whitespace(which, msgs, request):
    """On the locally trained BPE always; on GPT-NeoX-20B's when ../shared has it."""
    tok = request.getfixturevalue("bpe_tokenizer" if which == "local" else "neox_tokenizer")
    eos, bos = special_tokens(tok)
    enc = encode_conversation(tok, OCK, msgs)
    assert enc.input_ids == tok.encode(OCK.render(msgs, eos, bos), add_special_tokens=False)
