"""The templates of the 2023 chat models, checked against their origins' exact text, against the
Jinja template generated from the same definition, and token by token against hand-computed labels."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from chatkit import templates
from chatkit.conversation import Message
from chatkit.templates import (
    ChatTemplate,
    FamilyTemplate,
    HFChatTemplate,
    Segment,
    alpaca_messages,
    get_template,
    list_templates,
    register_template,
)
from chatkit.tokenization import IGNORE_INDEX, encode_conversation, encode_prompt, special_tokens

X = IGNORE_INDEX
NAMED = ["alpaca", "koala", "llama2", "vicuna", "chatml"]
ALPACA, KOALA, LLAMA2, VICUNA, CHATML = (get_template(n) for n in NAMED)


def U(text: str, train: bool | None = None) -> Message:
    return Message("user", text, train)


def A(text: str, train: bool | None = None) -> Message:
    return Message("assistant", text, train)


def S(text: str) -> Message:
    return Message("system", text)


def _dicts(msgs):
    return [{"role": m.role, "content": m.content} for m in msgs]


# --- alpaca: yxuansu/OpenAlpaca datasets/sft_dataset.py (2023-05-27), = Stanford Alpaca's prompts --

OPENALPACA_PROMPT_DICT = {
    "prompt_input": "Below is an instruction that describes a task, paired with an input that provides further context. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    "prompt_no_input": "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:",
}
PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_alpaca_single_turn():
    text = ALPACA.render([U("What is an alpaca?"), A("An animal.")], "</s>", "<s>")
    assert text == (f"<s>{PREAMBLE}\n\n### Instruction:\nWhat is an alpaca?\n\n### Response: An animal.</s>")


def test_alpaca_prompt_is_openalpacas_prompt_no_input():
    prompt = ALPACA.render([U("What is an alpaca?")], "</s>", "<s>", add_generation_prompt=True)
    expected = OPENALPACA_PROMPT_DICT["prompt_no_input"].format_map({"instruction": "What is an alpaca?"})
    assert prompt == "<s>" + expected


def test_alpaca_input_variant_is_openalpacas_prompt_input():
    msgs = alpaca_messages("Summarize the text.", "Alpacas are camelids.", "They are camelids.")
    row = {"instruction": "Summarize the text.", "input": "Alpacas are camelids."}
    prompt = ALPACA.render(msgs[:-1], "</s>", "<s>", add_generation_prompt=True)
    assert prompt == "<s>" + OPENALPACA_PROMPT_DICT["prompt_input"].format_map(row)
    assert msgs[1].content == "Summarize the text.\n\n### Input:\nAlpacas are camelids."
    # the reply follows after the space SentencePiece gave it (prompt and reply encoded separately)
    full = ALPACA.render(msgs, "</s>", "<s>")
    assert full == prompt + " They are camelids.</s>"


def test_alpaca_rows_from_shared_data_render_as_openalpaca(shared_data):
    file = shared_data / "alpaca_en_demo.json"
    if not file.is_file():
        pytest.skip(f"{file} not found")
    rows = json.loads(file.read_text(encoding="utf-8"))
    n_input = 0
    for row in rows[:300]:
        key = "prompt_input" if row["input"] else "prompt_no_input"
        n_input += bool(row["input"])
        msgs = alpaca_messages(row["instruction"], row["input"], row["output"])
        expected = "<s>" + OPENALPACA_PROMPT_DICT[key].format_map(row) + " " + row["output"] + "</s>"
        assert ALPACA.render(msgs, "</s>", "<s>") == expected
    assert n_input > 50  # both variants were exercised


def test_alpaca_multi_turn():
    text = ALPACA.render([U("hi"), A("hello"), U("how are you"), A("fine")], "</s>", "<s>")
    assert text == (
        f"<s>{PREAMBLE}\n\n### Instruction:\nhi\n\n### Response: hello</s>\n\n"
        "### Instruction:\nhow are you\n\n### Response: fine</s>"
    )


def test_alpaca_with_system_replaces_preamble():
    text = ALPACA.render([S("Be terse."), U("hi"), A("hello")], "</s>", "<s>")
    assert text == "<s>Be terse.\n\n### Instruction:\nhi\n\n### Response: hello</s>"


# --- koala: young-geng/EasyLM docs/koala.md + EasyLM/serving.py process_chat ---------------------


def easylm_koala_prompt(turns: list[tuple[str, str | None]]) -> str:
    """EasyLM's LMServer.process_chat with the Koala flags of docs/koala.md, as text (the generated
    reply starts with its own space token)."""
    prepend, user_prefix, user_suffix, lm_prefix, lm_suffix = (
        "BEGINNING OF CONVERSATION: ",
        "USER: ",
        " ",
        "GPT:",
        "</s>",
    )
    context = ""
    for prompt, response in turns:
        context = context + user_prefix + prompt + user_suffix + lm_prefix
        if response is None:
            return prepend + context
        context = context + " " + response + lm_suffix
    return prepend + context


def test_koala_single_turn():
    assert KOALA.render([U("hi"), A("hello")], "</s>", "<s>") == (
        "<s>BEGINNING OF CONVERSATION: USER: hi GPT: hello</s>"
    )


def test_koala_multi_turn_matches_easylm_serving():
    msgs = [U("hi"), A("hello"), U("how are you"), A("fine"), U("bye")]
    prompt = KOALA.render(msgs, "</s>", "<s>", add_generation_prompt=True)
    assert prompt == "<s>" + easylm_koala_prompt([("hi", "hello"), ("how are you", "fine"), ("bye", None)])
    assert prompt == (
        "<s>BEGINNING OF CONVERSATION: USER: hi GPT: hello</s>USER: how are you GPT: fine</s>USER: bye GPT:"
    )


def test_koala_with_system():
    text = KOALA.render([S("Be brief."), U("hi"), A("hello")], "</s>", "<s>")
    assert text == "<s>BEGINNING OF CONVERSATION: Be brief. USER: hi GPT: hello</s>"


# --- vicuna: lm-sys/FastChat fastchat/conversation.py vicuna_v1.1 (ADD_COLON_TWO) ------------------

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def fastchat_add_colon_two(system: str, roles, messages, sep=" ", sep2="</s>") -> str:
    """FastChat's Conversation.get_prompt for SeparatorStyle.ADD_COLON_TWO."""
    seps = [sep, sep2]
    ret = system + seps[0]
    for i, (role, message) in enumerate(messages):
        ret += role + ": " + message + seps[i % 2] if message else role + ":"
    return ret


def test_vicuna_single_turn():
    assert VICUNA.render([U("hi"), A("hello")], "</s>", "<s>") == (
        f"<s>{VICUNA_SYSTEM} USER: hi ASSISTANT: hello</s>"
    )


def test_vicuna_multi_turn_matches_fastchat():
    turns = [("USER", "hi"), ("ASSISTANT", "hello"), ("USER", "how are you"), ("ASSISTANT", None)]
    msgs = [U("hi"), A("hello"), U("how are you")]
    prompt = VICUNA.render(msgs, "</s>", "<s>", add_generation_prompt=True)
    assert prompt == "<s>" + fastchat_add_colon_two(VICUNA_SYSTEM, ("USER", "ASSISTANT"), turns)
    assert prompt.endswith("</s>USER: how are you ASSISTANT:")


def test_vicuna_with_system_and_koala_match_fastchat():
    msgs = [S("Be brief."), U("hi"), A("hello"), U("more")]
    turns = [("USER", "hi"), ("ASSISTANT", "hello"), ("USER", "more"), ("ASSISTANT", None)]
    expected = fastchat_add_colon_two("Be brief.", ("USER", "ASSISTANT"), turns)
    assert VICUNA.render(msgs, "</s>", "<s>", add_generation_prompt=True) == "<s>" + expected
    # FastChat's koala_v1 is the same style with the header as its system text
    koala_turns = [("USER", "hi"), ("GPT", "hello"), ("USER", "more"), ("GPT", None)]
    koala = fastchat_add_colon_two("BEGINNING OF CONVERSATION:", ("USER", "GPT"), koala_turns)
    assert KOALA.render(msgs[1:], "</s>", "<s>", add_generation_prompt=True) == "<s>" + koala


# --- llama2: meta-llama/llama llama/generation.py chat_completion + HF Llama-2-chat template ------

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

# meta-llama/Llama-2-13b-chat-hf tokenizer_config.json "chat_template" (quoted by mistral.rs's tests)
LLAMA2_HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def meta_llama2_text(dialog: list[dict]) -> str:
    """Meta's chat_completion prompt as text: bos/eos written as <s>/</s>; a dialog ending with an
    answer renders all pairs (as for training)."""
    if dialog[0]["role"] == "system":
        first = {
            "role": dialog[1]["role"],
            "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"],
        }
        dialog = [first, *dialog[2:]]
    text = "".join(
        f"<s>{B_INST} {(prompt['content']).strip()} {E_INST} {(answer['content']).strip()} </s>"
        for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False)
    )
    if len(dialog) % 2:
        text += f"<s>{B_INST} {(dialog[-1]['content']).strip()} {E_INST}"
    return text


LLAMA2_DIALOGS = {
    "single": [U("hi"), A("hello")],
    "prompt": [U("hi")],
    "system": [S("Be brief."), U("hi"), A("hello")],
    "system-prompt": [S("Be brief."), U("hi"), A("hello"), U("more")],
    "multi": [U("hi"), A("hello"), U("how are you"), A("fine"), U("bye")],
    "stripped": [U("hi \n"), A("   I am an assistant   "), U("\tmore")],
}


@pytest.mark.parametrize("dialog", list(LLAMA2_DIALOGS), ids=str)
def test_llama2_matches_meta_chat_completion(dialog):
    msgs = LLAMA2_DIALOGS[dialog]
    gen = msgs[-1].role == "user"
    assert LLAMA2.render(msgs, "</s>", "<s>", add_generation_prompt=gen) == meta_llama2_text(_dicts(msgs))


@pytest.mark.parametrize("dialog", list(LLAMA2_DIALOGS), ids=str)
def test_llama2_matches_official_hf_template(wordlevel_tokenizer, dialog):
    msgs = LLAMA2_DIALOGS[dialog]
    official = wordlevel_tokenizer.apply_chat_template(
        _dicts(msgs), chat_template=LLAMA2_HF_TEMPLATE, tokenize=False, bos_token="<s>", eos_token="</s>"
    )
    assert LLAMA2.render(msgs, "</s>", "<s>") == official


def test_llama2_literals():
    assert LLAMA2.render([U("hi"), A("hello")], "</s>", "<s>") == "<s>[INST] hi [/INST] hello </s>"
    # mistral.rs's expected output for the official Llama-2-13b-chat-hf template
    msgs = [
        S("You are a helpful assistant"),
        U("Hello"),
        A("Hi there"),
        U("Who are you"),
        A("   I am an assistant   "),
        U("Another question"),
    ]
    assert LLAMA2.render(msgs, "</s>", "<s>", add_generation_prompt=True) == (
        "<s>[INST] <<SYS>>\nYou are a helpful assistant\n<</SYS>>\n\nHello [/INST] Hi there </s>"
        "<s>[INST] Who are you [/INST] I am an assistant </s><s>[INST] Another question [/INST]"
    )


def test_llama2_segments_put_system_inside_first_inst():
    segs = LLAMA2.segments([S(" sys "), U(" q "), A(" a "), U("r")], "</s>", "<s>")
    assert segs == [
        Segment("<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\n", False),
        Segment("q [/INST]", False),
        Segment(" a </s>", True),
        Segment("<s>[INST] r [/INST]", False),
    ]
    assert LLAMA2.reply_text(" Sure thing. ") == "Sure thing."


# --- chatml: openai/openai-python chatml.md (ChatML v0) ------------------------------------------

CHATML_DOC_SYSTEM = (
    "You are ChatGPT, a large language model trained by OpenAI. Answer as concisely as possible.\n"
    "Knowledge cutoff: 2021-09-01\nCurrent date: 2023-03-01"
)


def test_chatml_matches_openai_doc():
    msgs = [S(CHATML_DOC_SYSTEM), U("How are you"), A("I am doing well!"), U("How are you now?")]
    # the doc's raw string, plus the "\n" its token list puts after the last <|im_end|>
    assert CHATML.render(msgs, "</s>") == (
        "<|im_start|>system\nYou are ChatGPT, a large language model trained by OpenAI. Answer as concisely as possible.\n"
        "Knowledge cutoff: 2021-09-01\nCurrent date: 2023-03-01<|im_end|>\n"
        "<|im_start|>user\nHow are you<|im_end|>\n"
        "<|im_start|>assistant\nI am doing well!<|im_end|>\n"
        "<|im_start|>user\nHow are you now?<|im_end|>\n"
    )


def test_chatml_single_and_multi_turn():
    assert CHATML.render([U("hi"), A("hello")], "</s>", "<s>") == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
    )
    assert CHATML.render([U("hi"), A("hello"), U("more")], "</s>", "<s>", add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"
        "<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n"
    )


# --- metadata --------------------------------------------------------------------------------------


def test_stop_strings_special_tokens_and_registry():
    assert {n: get_template(n).stop_strings for n in NAMED} == {
        "alpaca": ("### Instruction:",),
        "koala": ("USER:",),
        "llama2": ("[INST]",),
        "vicuna": ("USER:",),
        "chatml": ("<|im_end|>",),
    }
    assert CHATML.special_tokens == ("<|im_start|>", "<|im_end|>")
    assert all(get_template(n).special_tokens == () for n in NAMED if n != "chatml")
    assert list_templates() == [
        "alpaca", "chatml", "gemma", "hf", "koala", "llama2", "llama3", "mistral", "openchatkit", "qwen3", "vicuna"
    ]  # fmt: skip
    for name in list_templates():
        if name != "hf":  # the family templates (llama3, qwen3, ...) are tested in test_templates_families.py
            assert (
                isinstance(get_template(name), ChatTemplate | FamilyTemplate)
                and get_template(name).name == name
            )


def test_hf_name_is_reserved():
    with pytest.raises(ValueError, match="reserved"):
        register_template(ChatTemplate(name="hf"))


# --- generated Jinja agrees with the renderer -------------------------------------------------------

CONVERSATIONS = {
    "single": [U("hi there"), A("hello")],
    "user-only": [U("hi there")],
    "system": [S("be brief"), U("hi"), A("hello")],
    "multi-turn": [S("be brief"), U("hi"), A("hello"), U("how are you"), A("fine thanks")],
    "ends-with-user": [U("hi"), A("hello"), U("how are you")],
    "whitespace": [S("  be brief \n"), U("\thi there  "), A("  hello\n\n"), U(" how ")],
    "unicode": [U("Grüße, 你好 👋 — ça va?"), A("Très bien ✓\n\tmerci")],
    "braces": [S("{eos} {bos}"), U("{content} {{content}} {% raw %}"), A("{eos}{content} }}{{")],
    "empty-content": [U(""), A("")],
}


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no-gen", "gen"])
@pytest.mark.parametrize("conv", list(CONVERSATIONS), ids=str)
def test_render_matches_generated_chat_template(neox_tokenizer, name, add_generation_prompt, conv):
    tok, template, msgs = neox_tokenizer, get_template(name), CONVERSATIONS[conv]
    tok.chat_template = template.chat_template
    ours = template.render(msgs, tok.eos_token, tok.bos_token, add_generation_prompt)
    theirs = tok.apply_chat_template(
        _dicts(msgs), tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert ours == theirs
    ids = tok.apply_chat_template(_dicts(msgs), add_generation_prompt=add_generation_prompt)["input_ids"]
    assert ids == tok.encode(ours, add_special_tokens=False)


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("conv", ["single", "multi-turn", "whitespace"], ids=str)
def test_render_matches_generated_chat_template_without_bos(wordlevel_tokenizer, name, conv):
    tok, template, msgs = wordlevel_tokenizer, get_template(name), CONVERSATIONS[conv]
    tok.chat_template = template.chat_template
    for gen in (False, True):
        ours = template.render(msgs, tok.eos_token, "", gen)
        assert ours == tok.apply_chat_template(_dicts(msgs), tokenize=False, add_generation_prompt=gen)


def test_user_after_system_follows_default_system(wordlevel_tokenizer):
    t = ChatTemplate(
        name="t",
        system="[S {content}]",
        user_after_system="<{content}>",
        user="[U {content}]",
        default_system="d",
    )
    wordlevel_tokenizer.chat_template = t.chat_template
    for msgs in ([U("a"), A("b"), U("c")], [S("s"), U("a"), A("b"), U("c")], [A("b"), U("c")]):
        ours = t.render(msgs, "E")
        assert ours == wordlevel_tokenizer.apply_chat_template(_dicts(msgs), tokenize=False, eos_token="E")
    assert t.render([U("a"), A("b"), U("c")], "E") == "[S d]<a>bE[U c]"
    assert t.render([S("s"), U("a")], "E") == "[S s]<a>"
    assert t.render([A("b"), U("c")], "E") == "[S d]bE[U c]"


# --- hand-computed ids and labels ----------------------------------------------------------------

SMALL_VOCAB = {
    "[UNK]": 0,
    "<s>": 1,
    "</s>": 2,
    "[INST]": 3,
    "[/INST]": 4,
    "<<SYS>>": 5,
    "<</SYS>>": 6,
    "\n": 7,
    "hi": 8,
    "hello": 9,
    "be": 10,
    "brief": 11,
    "how": 12,
    "are": 13,
    "you": 14,
    "fine": 15,
    "<|im_start|>": 16,
    "<|im_end|>": 17,
    "system": 18,
    "user": 19,
    "assistant": 20,
}
TWO_TURNS = [S("be brief"), U("hi"), A("hello"), U("how are you"), A("fine")]


def small_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level: spaces separate words and vanish, every "\\n" is a token, <s>/</s> are special."""
    tok = Tokenizer(WordLevel(dict(SMALL_VOCAB), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(" +"), behavior="removed"),
            pre_tokenizers.Split("\n", behavior="isolated"),
        ]
    )
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def with_chatml_markers(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok.add_special_tokens({"additional_special_tokens": list(CHATML.special_tokens)})
    assert tok.convert_tokens_to_ids(list(CHATML.special_tokens)) == [16, 17]
    return tok


def test_llama2_ids_and_labels_by_hand():
    enc = encode_conversation(small_tokenizer(), LLAMA2, TWO_TURNS)
    # <s> [INST] <<SYS>> \n be brief \n <</SYS>> \n \n hi [/INST] | hello </s> | <s> [INST] how are you [/INST] | fine </s>
    assert enc.input_ids == [1, 3, 5, 7, 10, 11, 7, 6, 7, 7, 8, 4, 9, 2, 1, 3, 12, 13, 14, 4, 15, 2]
    assert enc.labels == [X, X, X, X, X, X, X, X, X, X, X, X, 9, 2, X, X, X, X, X, X, 15, 2]
    prompt = encode_prompt(small_tokenizer(), LLAMA2, TWO_TURNS[:4])
    assert prompt == [1, 3, 5, 7, 10, 11, 7, 6, 7, 7, 8, 4, 9, 2, 1, 3, 12, 13, 14, 4]


def test_chatml_needs_its_markers_as_special_tokens():
    # without them "<|im_start|>user" is one unknown word
    assert 0 in encode_conversation(small_tokenizer(), CHATML, TWO_TURNS).input_ids


def test_chatml_ids_and_labels_by_hand():
    tok = with_chatml_markers(small_tokenizer())
    enc = encode_conversation(tok, CHATML, TWO_TURNS)
    # <|im_start|> system \n be brief <|im_end|> \n | <|im_start|> user \n hi <|im_end|> \n |
    # <|im_start|> assistant \n | hello <|im_end|> | \n | <|im_start|> user \n how are you <|im_end|> \n |
    # <|im_start|> assistant \n | fine <|im_end|> | \n
    assert enc.input_ids == [
        16, 18, 7, 10, 11, 17, 7, 16, 19, 7, 8, 17, 7, 16, 20, 7, 9, 17, 7,
        16, 19, 7, 12, 13, 14, 17, 7, 16, 20, 7, 15, 17, 7,
    ]  # fmt: skip
    assert enc.labels == [
        X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, 9, 17, X,
        X, X, X, X, X, X, X, X, X, X, X, 15, 17, X,
    ]  # fmt: skip
    assert encode_prompt(tok, CHATML, TWO_TURNS[:2]) == [
        16,
        18,
        7,
        10,
        11,
        17,
        7,
        16,
        19,
        7,
        8,
        17,
        7,
        16,
        20,
        7,
    ]


# --- with the GPT-NeoX-20B tokenizer --------------------------------------------------------------

MASK_CONVERSATIONS = {
    "single": [U("hi"), A("yo there")],
    "multi-turn": [S("Be brief."), U("hi"), A("yo there"), U("more?"), A("Sure, ünïcode {eos}.")],
    "three-turns": [U("a b"), A("c\nd"), U("e"), A("f g"), U("h"), A("i")],
}


@pytest.mark.parametrize("name", NAMED)
@pytest.mark.parametrize("conv", list(MASK_CONVERSATIONS), ids=str)
def test_hf_assistant_mask_matches_our_labels(neox_tokenizer, name, conv):
    tok, template, msgs = neox_tokenizer, get_template(name), MASK_CONVERSATIONS[conv]
    tok.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    tok.chat_template = template.chat_template
    out = tok.apply_chat_template(_dicts(msgs), return_dict=True, return_assistant_tokens_mask=True)
    enc = encode_conversation(tok, template, msgs)
    assert out["input_ids"] == enc.input_ids
    ours = [int(label != IGNORE_INDEX) for label in enc.labels]
    assert sum(ours) > 0
    assert list(out["assistant_masks"]) == ours


@pytest.mark.parametrize("name", NAMED)
def test_end_of_turn_token_of_every_trained_reply_is_trained(neox_tokenizer, name):
    tok, template = neox_tokenizer, get_template(name)
    tok.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    msgs = [*MASK_CONVERSATIONS["three-turns"][:-1], A("i", train=False)]
    enc = encode_conversation(tok, template, msgs)
    end = "<|im_end|>" if name == "chatml" else tok.eos_token
    end_id = tok.convert_tokens_to_ids(end)
    # the end of the two trained replies is trained; the untrained reply's end and (for ChatML) the
    # ends of user turns are not
    trained_ends = [i for i, lab in enumerate(enc.labels) if lab == end_id]
    assert len(trained_ends) == 2
    # 20B's bos is its eos: alpaca, koala and vicuna open with it once, llama2 opens every [INST]
    all_ends = [i for i, t in enumerate(enc.input_ids) if t == end_id]
    assert len(all_ends) == {"alpaca": 4, "koala": 4, "vicuna": 4, "llama2": 6, "chatml": 6}[name]
    # each trained end is the last trained token of its reply
    for i in trained_ends:
        assert enc.labels[i + 1 : i + 2] in ([], [X])


GENERATION_PROMPTS = {
    "alpaca": "### Response:",
    "koala": "GPT:",
    "llama2": "[/INST]",
    "vicuna": "ASSISTANT:",
    "chatml": "<|im_start|>assistant\n",
}


@pytest.mark.parametrize("name", NAMED)
def test_encode_prompt_ends_with_generation_prompt(neox_tokenizer, name):
    tok, template = neox_tokenizer, get_template(name)
    eos, bos = special_tokens(tok)
    for history in ([U("hi there")], [S("Be brief."), U("hi"), A("yo"), U("more?")]):
        ids = encode_prompt(tok, template, history)
        text = template.render(history, eos, bos, add_generation_prompt=True)
        assert text.endswith(GENERATION_PROMPTS[name])
        assert ids == tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids).endswith(GENERATION_PROMPTS[name])
    if name == "chatml":  # <|im_start|> assistant \n
        assert ids[-3:] == [50277, 50279, 187]
    if name == "llama2":  # the prompt is the conversation: [/INST] closes the user turn
        assert ids == encode_conversation(tok, template, history).input_ids


# --- hf: the tokenizer's own chat_template ---------------------------------------------------------

# The ChatML template Hugging Face models ship (e.g. teknium/OpenHermes-2.5-Mistral-7B)
HF_CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Zephyr-style (HuggingFaceH4/zephyr-7b-beta); Hugging Face renders with trim_blocks, so only the
# newlines after {{ ... }} remain
HF_ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n"
    "{% endif %}\n{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n{% endfor %}"
)


def test_hf_needs_a_tokenizer_with_a_chat_template(wordlevel_tokenizer):
    with pytest.raises(ValueError, match="pass the tokenizer"):
        get_template("hf")
    assert wordlevel_tokenizer.chat_template is None
    with pytest.raises(ValueError, match="has none"):
        get_template("hf", wordlevel_tokenizer)


def test_hf_interface(wordlevel_tokenizer):
    wordlevel_tokenizer.chat_template = HF_ZEPHYR
    t = get_template("hf", wordlevel_tokenizer)
    assert isinstance(t, HFChatTemplate)
    assert (t.name, t.chat_template, t.stop_strings, t.default_system, t.special_tokens) == (
        "hf",
        HF_ZEPHYR,
        (),
        None,
        (),
    )
    assert t.reply_text(" as is ") == " as is "
    assert get_template("chatml", wordlevel_tokenizer) is CHATML  # named templates ignore the tokenizer


def test_hf_chatml_segments_and_labels_by_hand():
    tok = with_chatml_markers(small_tokenizer())
    tok.chat_template = HF_CHATML
    hf = get_template("hf", tok)
    assert hf.segments(TWO_TURNS[:3], "</s>", "<s>") == [
        Segment("<|im_start|>system\nbe brief<|im_end|>\n", False),
        Segment("<|im_start|>user\nhi<|im_end|>\n", False),
        Segment("<|im_start|>assistant\n", False),
        Segment("hello<|im_end|>\n", True),
    ]
    assert hf.render(TWO_TURNS, "</s>", add_generation_prompt=True) == CHATML.render(
        TWO_TURNS, "</s>", add_generation_prompt=True
    )
    enc = encode_conversation(tok, hf, TWO_TURNS)
    assert enc.input_ids == encode_conversation(tok, CHATML, TWO_TURNS).input_ids
    # as chatml, except that the "\n" after <|im_end|> belongs to the trained rest of the reply
    assert enc.labels == [
        X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, X, 9, 17, 7,
        X, X, X, X, X, X, X, X, X, X, X, 15, 17, 7,
    ]  # fmt: skip
    assert encode_prompt(tok, hf, TWO_TURNS[:4]) == encode_conversation(tok, hf, TWO_TURNS[:4]).input_ids + [
        16,
        20,
        7,
    ]


def test_hf_zephyr_segments(wordlevel_tokenizer):
    wordlevel_tokenizer.chat_template = HF_ZEPHYR
    hf = get_template("hf", wordlevel_tokenizer)
    segs = hf.segments(
        [S("be brief"), U("hi"), A("hello"), U("you", train=True)], "</s>", add_generation_prompt=True
    )
    assert segs == [
        Segment("<|system|>\nbe brief</s>\n", False),
        Segment("<|user|>\nhi</s>\n", False),
        Segment("<|assistant|>\n", False),
        Segment("hello</s>\n", True),
        Segment("<|user|>\nyou</s>\n", True),
        Segment("<|assistant|>\n", False),
    ]
    text = "".join(s.text for s in segs)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    msgs += [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "you"}]
    assert text == wordlevel_tokenizer.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, eos_token="</s>"
    )


def test_hf_llama2_official_template_matches_llama2(wordlevel_tokenizer):
    wordlevel_tokenizer.chat_template = LLAMA2_HF_TEMPLATE
    hf = get_template("hf", wordlevel_tokenizer)
    for msgs in LLAMA2_DIALOGS.values():
        assert hf.render(msgs, "</s>", "<s>") == LLAMA2.render(msgs, "</s>", "<s>")
    segs = hf.segments([S("sys"), U("hi"), A("hello")], "</s>", "<s>")
    assert segs == [
        Segment("<s>[INST] <<SYS>>\nsys\n<</SYS>>\n\nhi [/INST]", False),
        Segment(" hello </s>", True),
    ]


BOT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<bot>\n' + m['content'] + eos_token }}"
    "{% else %}{{ m['content'] + '\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}GEN{% endif %}"
)


@pytest.mark.parametrize(
    ("generation_prompt", "segments"),
    [
        ("<bot>", [Segment("hi\n", False), Segment("<bot>", False), Segment("\nhelloE", True)]),
        ("", [Segment("hi\n", False), Segment("<bot>\nhelloE", True)]),
    ],
    ids=["shorter-than-header", "none"],
)
def test_hf_assistant_turn_split_at_generation_prompt(wordlevel_tokenizer, generation_prompt, segments):
    wordlevel_tokenizer.chat_template = BOT_TEMPLATE.replace("GEN", generation_prompt)
    hf = get_template("hf", wordlevel_tokenizer)
    assert hf.segments([U("hi"), A("hello")], "E") == segments


def test_hf_generation_prompt_not_opening_the_turn_raises(wordlevel_tokenizer):
    wordlevel_tokenizer.chat_template = BOT_TEMPLATE.replace("GEN", "<bot>:")
    hf = get_template("hf", wordlevel_tokenizer)
    assert hf.render([U("hi")], "E", add_generation_prompt=True) == "hi\n<bot>:"
    with pytest.raises(ValueError, match="prefix-stable"):
        hf.segments([U("hi"), A("hello")], "E")


def test_hf_not_prefix_stable_raises(wordlevel_tokenizer):
    # marks the last message, so adding a message rewrites the text before it
    wordlevel_tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.last %}[LAST]{% endif %}{{ m['content'] }}\n{% endfor %}"
    )
    hf = get_template("hf", wordlevel_tokenizer)
    assert hf.render([U("hi")], "</s>") == "[LAST]hi\n"
    with pytest.raises(ValueError, match="prefix-stable"):
        hf.segments([U("hi"), A("hello")], "</s>")


def test_registry_unchanged_by_hf(monkeypatch):
    monkeypatch.setattr(templates, "_REGISTRY", dict(templates._REGISTRY))
    register_template(ChatTemplate(name="zz-test"))
    assert list_templates()[-1] == "zz-test" and "hf" in list_templates()
    with pytest.raises(KeyError, match="hf"):
        get_template("nope")


# --- openchatkit: togethercomputer/OpenChatKit inference/conversation.py (commit 277623eb) ----------


class OpenChatKitConversation:
    """OpenChatKit's Conversation (inference/conversation.py), without its date/time pre-prompt:
    push_human_turn (lines 30-32) appends "<human>: {query}\\n<bot>:"; push_model_response (lines 34-42)
    cuts the generated text at "<human>:", removes "<|endoftext|>" and newlines around it
    (clean_response, lines 11-15) and appends "{bot_turn}\\n": past replies carry no eos."""

    def __init__(self) -> None:
        self.prompt = ""

    def push_human_turn(self, query: str) -> None:
        self.prompt += f"<human>: {query}\n"
        self.prompt += "<bot>:"

    def push_model_response(self, response: str) -> None:
        bot_turn = response.split("<human>:")[0]
        for word in ("<pad>", "</s>", "<|endoftext|>"):
            bot_turn = bot_turn.replace(word, "")
        self.prompt += f"{bot_turn.strip(chr(10))}\n"


OCK = get_template("openchatkit")


@pytest.mark.parametrize("system", [None, "You are a helpful bot."], ids=["no-system", "system"])
def test_openchatkit_history_matches_openchatkit_conversation(system):
    turns = [("Hello", "Hi there!"), ("How are you?", "Fine.\nThanks."), ("Bye", None)]
    conv = OpenChatKitConversation()
    msgs = [S(system)] if system else []
    if system:  # free text before the first turn, as OpenChatKit's PRE_PROMPT header (lines 5-9)
        conv.prompt += system + "\n"
    for query, reply in turns:
        conv.push_human_turn(query)
        msgs.append(U(query))
        if reply is not None:
            # the model's generated text: the reply after the space the prompt leaves, then its eos
            conv.push_model_response(" " + reply + "<|endoftext|>")
            msgs.append(A(reply))
    prompt = OCK.render(msgs, "<|endoftext|>", "<|endoftext|>", add_generation_prompt=True)
    assert prompt == conv.prompt  # the history a chat feeds back is OpenChatKit's, character for character


def test_openchatkit_chat_prompt_ids_are_the_origins_ids(neox_tokenizer):
    # token for token with the origin's tokenizer (GPT-NeoX-20B's): the prompt chatkit encodes for a
    # multi-turn chat is the tokenizer's encoding of OpenChatKit's own prompt text
    conv = OpenChatKitConversation()
    msgs = []
    for query, reply in [("What is 2 + 2?", "4."), ("And  3 + 3?\tTell me", "6\n\nDone."), ("Thanks", None)]:
        conv.push_human_turn(query)
        msgs.append(U(query))
        if reply is not None:
            conv.push_model_response(" " + reply + "<|endoftext|>")
            msgs.append(A(reply))
    ours = encode_prompt(neox_tokenizer, OCK, msgs)
    assert ours == neox_tokenizer(conv.prompt, add_special_tokens=False)["input_ids"]


def test_openchatkit_training_row_is_oig_text_with_trained_stops():
    # OIG's texts ("<human>: ...\n<bot>: ...\n<human>: ...") as they are; a past reply's stop signal is
    # the next turn's marker, trained with it; the final reply ends with the document's eos, trained
    msgs = [U("q1"), A("a1"), U("q2"), A("a2")]
    segs = OCK.segments(msgs, "<|endoftext|>")
    assert "".join(s.text for s in segs) == "<human>: q1\n<bot>: a1\n<human>: q2\n<bot>: a2<|endoftext|>\n"
    assert [s.text for s in segs if s.trained] == [" a1\n<human>:", " a2<|endoftext|>"]


def test_openchatkit_stop_tokens_are_trained(neox_tokenizer):
    enc = encode_conversation(neox_tokenizer, OCK, [U("q1"), A("a1"), U("q2"), A("a2")])
    eos = neox_tokenizer.eos_token_id
    assert enc.input_ids.count(eos) == 1 and enc.input_ids[-2] == eos and enc.labels[-2] == eos
    assert enc.labels[-1] == IGNORE_INDEX  # the untrained newline after the row's eos
    # the past reply's "\n<human>:" tokens are targets; the next question's are not
    marker = neox_tokenizer("\n<human>:", add_special_tokens=False)["input_ids"]
    ids = enc.input_ids
    at = next(i for i in range(len(ids)) if ids[i : i + len(marker)] == marker)
    assert enc.labels[at : at + len(marker)] == marker
    q2 = neox_tokenizer(" q2", add_special_tokens=False)["input_ids"]
    assert all(label == IGNORE_INDEX for label in enc.labels[at + len(marker) : at + len(marker) + len(q2)])


# --- alpaca: yxuansu/OpenAlpaca datasets/sft_dataset.py (commit 193e0fa4) -------------------------


def test_alpaca_row_ends_with_eos_as_openalpaca_preprocess(shared_data):
    # preprocess (lines 36-56): inpt = [1] + s_tokens + t_tokens + [2] (line 51): nothing after eos
    rows = json.loads((shared_data / "alpaca_en_demo.json").read_text(encoding="utf-8"))[:50]
    for row in rows:
        msgs = alpaca_messages(row["instruction"], row["input"], row["output"])
        segs = ALPACA.segments(msgs, "</s>", "<s>")
        assert segs[-1] == Segment(" " + row["output"] + "</s>", True)
    # multi-turn (chatkit's extension): the blank line only between turns
    text = ALPACA.render([U("a"), A("b"), U("c"), A("d")], "</s>", "<s>")
    assert text.endswith("### Response: b</s>\n\n### Instruction:\nc\n\n### Response: d</s>")


# --- the exported generation region marks exactly the trained tokens ----------------------------

# replies whose first token is the head's space on its own or merged with it: a digit (Llama splits
# digits, so "▁" stands alone), a newline, a space, and a plain word; ends that merge with what follows
EDGE_REPLIES = [
    "42 is the answer.",
    "\nstarts on a new line",
    " starts with a space",
    "plain words.",
    "ends.\n",
]


@functools.cache
def _llama_tokenizer_json() -> str:
    import llama_spm

    from chatkit.convert.meta_llama import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tok = build_tokenizer(llama_spm.write_meta_tokenizer(Path(tmp)), 4096)
    return tok.backend_tokenizer.to_str()


def llama_tokenizer() -> PreTrainedTokenizerFast:
    """The Meta converter's tokenizer for the LLaMA-style sentencepiece model of tests/llama_spm.py."""
    if not (Path(__file__).resolve().parents[1].parent / "shared" / "data" / "alpaca_en_demo.json").is_file():
        pytest.skip("../shared/data/alpaca_en_demo.json not found")
    backend = Tokenizer.from_str(_llama_tokenizer_json())
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


@pytest.mark.parametrize("name", ["openchatkit", *NAMED])
@pytest.mark.parametrize("tokenizer", ["neox", "llama"])
def test_generation_mask_equals_labels_on_edge_replies(request, name, tokenizer):
    tok = request.getfixturevalue("neox_tokenizer") if tokenizer == "neox" else llama_tokenizer()
    template = get_template(name)
    tok.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    tok.chat_template = template.chat_template
    convs = [[U("question"), A(reply)] for reply in EDGE_REPLIES]
    convs.append([S("Be brief."), *(m for r in EDGE_REPLIES for m in (U(f"q {r[:3]}"), A(r)))])
    for msgs in convs:
        out = tok.apply_chat_template(_dicts(msgs), return_dict=True, return_assistant_tokens_mask=True)
        enc = encode_conversation(tok, template, msgs)
        assert out["input_ids"] == enc.input_ids
        ours = [int(label != IGNORE_INDEX) for label in enc.labels]
        assert list(out["assistant_masks"]) == ours, (name, msgs)
        # every reply token is trained, the reply's leading space (or its merged first word) included
        trained = tok.decode([t for t in enc.labels if t != IGNORE_INDEX])
        for m in msgs:
            if m.role == "assistant":
                assert (m.content.strip() if template.strip_content else m.content).strip() in trained
