from __future__ import annotations

import pytest

from chatkit import templates
from chatkit.conversation import Message
from chatkit.templates import ChatTemplate, Segment, get_template, list_templates, register_template
from chatkit.tokenization import IGNORE_INDEX, encode_conversation

EOS = "<|endoftext|>"

OCK = get_template("openchatkit")


def U(text: str, train: bool | None = None) -> Message:
    return Message("user", text, train)


def A(text: str, train: bool | None = None) -> Message:
    return Message("assistant", text, train)


def S(text: str) -> Message:
    return Message("system", text)


# --- exact openchatkit text ----------------------------------------------------------------------


def test_openchatkit_single_turn():
    text = OCK.render([U("Hello"), A("Hi there!")], EOS)
    assert text == "<human>: Hello\n<bot>: Hi there!<|endoftext|>\n"


def test_openchatkit_multi_turn():
    text = OCK.render([U("Hello"), A("Hi there!"), U("How are you?"), A("Fine.")], EOS)
    # OIG's documents and OpenChatKit's history: no eos after a past reply (the final one ends the row)
    assert text == "<human>: Hello\n<bot>: Hi there!\n<human>: How are you?\n<bot>: Fine.<|endoftext|>\n"


def test_openchatkit_with_system_message():
    text = OCK.render([S("You are a helpful bot."), U("Hello"), A("Hi.")], EOS)
    assert text == "You are a helpful bot.\n<human>: Hello\n<bot>: Hi.<|endoftext|>\n"


def test_openchatkit_generation_prompt():
    text = OCK.render([U("Hello")], EOS, add_generation_prompt=True)
    assert text == "<human>: Hello\n<bot>:"
    text = OCK.render([U("Hello"), A("Hi."), U("Again")], EOS, add_generation_prompt=True)
    assert text == "<human>: Hello\n<bot>: Hi.\n<human>: Again\n<bot>:"
    assert text.endswith("<bot>:")
    # without the flag there is no trailing prompt
    assert not OCK.render([U("Hello")], EOS).endswith("<bot>:")


def test_placeholders_in_content_are_not_substituted():
    msgs = [S("sys {eos}"), U("use {content} and {eos} and {bos}"), A("{bos}{content}{eos}")]
    text = OCK.render(msgs, "<E>", "<B>")
    assert text == "sys {eos}\n<human>: use {content} and {eos} and {bos}\n<bot>: {bos}{content}{eos}<E>\n"


def test_openchatkit_segments_and_flags():
    segs = OCK.segments([S("sys"), U("q", train=True), A("a"), U("r"), A("b", train=False)], EOS)
    assert segs == [
        Segment("sys\n", False),
        Segment("<human>: q\n", True),
        Segment("<bot>:", False),
        Segment(" a\n<human>:", True),  # a past reply's trained stop: the next turn's marker
        Segment(" r\n", False),
        Segment("<bot>:", False),
        Segment(" b<|endoftext|>", False),
        Segment("\n", False),
    ]
    gen = OCK.segments([U("q")], EOS, add_generation_prompt=True)
    assert gen == [Segment("<human>: q\n", False), Segment("<bot>:", False)]


def test_empty_pieces_are_dropped():
    t = ChatTemplate(name="t", user="{content}", assistant="{content}")
    segs = t.segments([U(""), A("x")], "E")
    assert all(s.text for s in segs)
    assert segs == [Segment("x", True)]


def test_bos_and_default_system():
    t = ChatTemplate(
        name="t",
        bos="{bos}",
        system="[S]{content}\n",
        default_system="be nice",
        assistant="{content}{eos}",
    )
    assert t.render([U("q"), A("a")], "E", "B") == "B[S]be nice\nq\naE"
    # an explicit system message replaces the default
    assert t.render([S("mine"), U("q")], "E", "B") == "B[S]mine\nq\n"
    assert t.segments([U("q")], "E", "B")[1] == Segment("[S]be nice\n", False)


def test_reply_text():
    assert OCK.reply_text(" hello") == "hello"
    assert OCK.reply_text("hello") == "hello"
    assert OCK.reply_text("  two") == " two"
    # a template whose assistant piece has no literal head leaves the text alone
    assert ChatTemplate(name="t").reply_text(" hello") == " hello"


def test_openchatkit_metadata():
    assert OCK.name == "openchatkit"
    assert OCK.stop_strings == ("<human>:",)


# --- registry -------------------------------------------------------------------------------------


def test_get_template_openchatkit():
    t = get_template("openchatkit")
    assert isinstance(t, ChatTemplate)
    assert t.name == "openchatkit"
    assert "openchatkit" in list_templates()
    assert list_templates() == sorted(list_templates())


def test_unknown_template_lists_known_names():
    with pytest.raises(KeyError) as excinfo:
        get_template("no-such-template")
    msg = excinfo.value.args[0]
    assert "no-such-template" in msg
    for name in list_templates():
        assert name in msg


def test_register_new_and_duplicate(monkeypatch):
    monkeypatch.setattr(templates, "_REGISTRY", dict(templates._REGISTRY))
    new = ChatTemplate(name="unit-test-template")
    assert register_template(new) is new
    assert get_template("unit-test-template") is new
    assert "unit-test-template" in list_templates()
    with pytest.raises(ValueError, match="already registered"):
        register_template(ChatTemplate(name="unit-test-template", user="x{content}"))
    assert get_template("unit-test-template") is new


def test_register_duplicate_builtin_raises_and_keeps_original():
    original = get_template("openchatkit")
    with pytest.raises(ValueError, match="openchatkit"):
        register_template(ChatTemplate(name="openchatkit"))
    assert get_template("openchatkit") is original


# --- agreement with Hugging Face apply_chat_template ---------------------------------------------

CONVERSATIONS = {
    "single": [U("hi there"), A("hello")],
    "user-only": [U("hi there")],
    "system": [S("be brief"), U("hi"), A("hello")],
    "multi-turn": [S("be brief"), U("hi"), A("hello"), U("how are you"), A("fine thanks")],
    "ends-with-user": [U("hi"), A("hello"), U("how are you")],
    "unicode": [U("Grüße, 你好 👋 — ça va?"), A("Très bien ✓\n\tmerci")],
    "braces": [S("{eos} {bos}"), U("{content} {{content}} {% raw %}"), A("{eos}{content} }}{{")],
    "train-flags": [U("hi", train=True), A("hello", train=False)],
    "empty-content": [U(""), A("")],
}

CUSTOM = ChatTemplate(
    name="custom-for-tests",
    bos="{bos}",
    system="<<SYS>>{content}<</SYS>>\n",
    user='[INST] "{content}" [/INST]',
    assistant_prefix="\n### Answer:",
    assistant=" {content} {eos}",
    separator="\n\n",
    default_system='You are "helpful".\n{braces} ü',
)


def _dicts(msgs):
    return [m.to_dict() for m in msgs]


@pytest.mark.parametrize("template", [OCK, CUSTOM], ids=lambda t: t.name)
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no-gen", "gen"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=str)
def test_render_matches_hf_chat_template_wordlevel(
    wordlevel_tokenizer, template, add_generation_prompt, conv
):
    tok = wordlevel_tokenizer
    tok.chat_template = template.chat_template
    msgs = CONVERSATIONS[conv]
    # the word-level tokenizer has no bos token: {bos} renders as "" on both sides
    ours = template.render(msgs, tok.eos_token, tok.bos_token or "", add_generation_prompt)
    theirs = tok.apply_chat_template(
        _dicts(msgs), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs


@pytest.mark.parametrize("template", [OCK, CUSTOM], ids=lambda t: t.name)
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no-gen", "gen"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=str)
def test_render_matches_hf_chat_template_neox(neox_tokenizer, template, add_generation_prompt, conv):
    tok = neox_tokenizer
    tok.chat_template = template.chat_template
    msgs = CONVERSATIONS[conv]
    ours = template.render(msgs, tok.eos_token, tok.bos_token, add_generation_prompt)
    theirs = tok.apply_chat_template(
        _dicts(msgs), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    # and tokenizing through HF gives the whole-string tokens
    ids = tok.apply_chat_template(
        _dicts(msgs), tokenize=True, return_dict=True, add_generation_prompt=add_generation_prompt
    )["input_ids"]
    assert ids == tok.encode(ours, add_special_tokens=False)


def test_chat_template_is_jinja_for_openchatkit():
    ct = OCK.chat_template
    assert "{%- generation -%}" in ct and "{%- endgeneration -%}" in ct
    assert "eos_token" in ct
    assert '"<human>: "' in ct and '"<bot>:"' in ct


@pytest.mark.parametrize(
    "conv",
    [
        [U("hi"), A("yo there")],
        [S("Be brief."), U("hi"), A("yo there"), U("more?"), A("Sure, ünïcode {eos}.")],
    ],
    ids=["single", "multi-turn"],
)
def test_hf_assistant_mask_matches_our_labels(neox_tokenizer, conv):
    tok = neox_tokenizer
    tok.chat_template = OCK.chat_template
    out = tok.apply_chat_template(
        _dicts(conv), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    enc = encode_conversation(tok, OCK, conv)
    assert out["input_ids"] == enc.input_ids
    ours = [int(label != IGNORE_INDEX) for label in enc.labels]
    assert sum(ours) > 0
    assert list(out["assistant_masks"]) == ours
