"""The family templates (llama3, qwen3, mistral, gemma) against the verbatim published Jinja templates in
tests/fixtures/chat_templates/ (sources in SOURCES.md there), rendered by transformers: the same text,
the same tokens, and a `{% generation %}` mask (of chatkit's exported template) equal to chatkit's labels.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from chatkit.conversation import Message, ToolCall, parse_conversation
from chatkit.data import fit_conversation
from chatkit.templates import get_template
from chatkit.templates.base import hf_message
from chatkit.tokenization import IGNORE_INDEX, encode_conversation, encode_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"
FAMILIES = ["llama3", "qwen3", "mistral", "gemma"]


def fixture(name: str) -> str:
    return (FIXTURES / f"{name}.jinja").read_text(encoding="utf-8")


def S(text: str) -> Message:
    return Message("system", text)


def U(text: str) -> Message:
    return Message("user", text)


def A(text: str, reasoning: str | None = None, calls: tuple[ToolCall, ...] = (), train=None) -> Message:
    return Message("assistant", text, train, tool_calls=calls, reasoning=reasoning)


def T(text: str, call_id: str | None = None, name: str | None = None) -> Message:
    return Message("tool", text, tool_call_id=call_id, name=name)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city, in °C.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": 'The city, e.g. "Paris"'}},
            "required": ["city"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time",
        "parameters": {"type": "object", "properties": {}},
    },
}
TOOLS = [WEATHER, TIME]
PARIS = ToolCall("get_weather", {"city": "Paris"}, "call12345")
TOKYO = ToolCall("get_weather", {"city": "Tōkyō"}, "call67890")
CLOCK = ToolCall("get_time", {}, "callclock")

# conversation name -> (messages, tools)
PLAIN = {
    "single": ([U("hi there"), A("hello")], None),
    "system": ([S("Be brief."), U("hi"), A("yo there"), U("more?"), A("Sure, ünïcode {eos}.")], None),
    "ends-with-user": ([S("Be brief."), U("hi"), A("yo"), U("more?")], None),
    "whitespace": ([U("\thi there  "), A("  hello\n\n"), U(" how "), A("fine")], None),
}
TOOL_USE = {
    "one-call": (
        [
            S("You help with weather."),
            U("Weather in Paris?"),
            A("", calls=(PARIS,)),
            T("22", "call12345"),
            A("22 °C."),
        ],
        TOOLS,
    ),
    "two-rounds": (
        [
            U("Paris?"),
            A("", calls=(PARIS,)),
            T('{"t": 22}', "call12345"),
            A("22."),
            U("Tokyo?"),
            A("", calls=(TOKYO,)),
        ],
        TOOLS,
    ),
    "tools-no-call": ([U("hi"), A("hello")], TOOLS),
}
PARALLEL = {  # two calls in one reply, two results in a row (Llama 3.1's template refuses this)
    "parallel": (
        [
            U("Weather and time?"),
            A("", calls=(PARIS, CLOCK)),
            T("22", "call12345"),
            T("09:00", "callclock"),
            A("22, 9am"),
        ],
        TOOLS,
    ),
}
REASONING = {
    "last-turn": ([U("2+2?"), A("4", reasoning="Add them.")], None),
    "past-and-last": ([U("2+2?"), A("4", reasoning="Add."), U("3+3?"), A("6", reasoning="Add again.")], None),
    "in-content": ([U("2+2?"), A("<think>\nAdd.\n</think>\n\n4"), U("and?")], None),
    "after-tool": (
        [
            U("Paris?"),
            A("", reasoning="Look it up.", calls=(PARIS,)),
            T("22", "call12345"),
            A("22.", reasoning="Got it."),
        ],
        TOOLS,
    ),
    "no-reasoning-last": ([U("hi"), A("hello"), U("again"), A("hello again")], None),
}

CASES = {
    "llama3": {**PLAIN, **TOOL_USE},
    "qwen3": {**PLAIN, **TOOL_USE, **PARALLEL, **REASONING},
    "mistral": {**PLAIN, **TOOL_USE, **PARALLEL},
    "gemma": {k: v for k, v in PLAIN.items()},
}
PARAMS = [(family, case) for family in FAMILIES for case in CASES[family]]


def _hf(msgs):
    return [hf_message(m) for m in msgs]


def _published(tok, template: str, msgs, tools, gen: bool, **kw) -> str:
    return tok.apply_chat_template(
        _hf(msgs), tools=tools, chat_template=template, tokenize=False, add_generation_prompt=gen, **kw
    )


PUBLISHED = {"llama3": "llama3", "qwen3": "qwen3", "mistral": "mistral", "gemma": "gemma3"}


@pytest.mark.parametrize(("family", "case"), PARAMS, ids=[f"{f}-{c}" for f, c in PARAMS])
@pytest.mark.parametrize("gen", [False, True], ids=["no-gen", "gen"])
def test_render_matches_published_template(bpe_tokenizer, family, case, gen):
    msgs, tools = CASES[family][case]
    template = get_template(family)
    ours = template.render(msgs, "</s>", "<s>", gen, tools=tools)
    kw = {"bos_token": "<s>", "eos_token": "</s>"}
    assert ours == _published(bpe_tokenizer, fixture(PUBLISHED[family]), msgs, tools, gen, **kw)
    # the exported template (the published one with {% generation %} marks) renders the same text
    assert ours == _published(bpe_tokenizer, template.chat_template, msgs, tools, gen, **kw)


@pytest.mark.parametrize(("family", "case"), PARAMS, ids=[f"{f}-{c}" for f, c in PARAMS])
@pytest.mark.parametrize("reasoning", ["train", "context"])
def test_generation_mask_equals_labels(bpe_tokenizer, family, case, reasoning):
    msgs, tools = CASES[family][case]
    template = get_template(family, reasoning=reasoning)
    tok = bpe_tokenizer
    tok.add_special_tokens({"additional_special_tokens": list(template.special_tokens)})
    out = tok.apply_chat_template(
        _hf(msgs),
        tools=tools,
        chat_template=template.chat_template,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    enc = encode_conversation(tok, template, msgs, tools)
    assert out["input_ids"] == enc.input_ids
    ours = [int(label != IGNORE_INDEX) for label in enc.labels]
    assert sum(ours) > 0
    assert list(out["assistant_masks"]) == ours


def test_gemma_without_system_is_gemma2s_published_text(bpe_tokenizer):
    # Gemma 2's template refuses a system message; without one, it and Gemma 3's render the same text
    for msgs, _ in PLAIN.values():
        msgs = [m for m in msgs if m.role != "system"]
        for gen in (False, True):
            gemma2 = _published(bpe_tokenizer, fixture("gemma2"), msgs, None, gen, bos_token="<s>")
            assert get_template("gemma").render(msgs, "</s>", "<s>", gen) == gemma2
    with pytest.raises(Exception, match="System role not supported"):
        _published(bpe_tokenizer, fixture("gemma2"), [S("s"), U("hi")], None, False, bos_token="<s>")
    assert get_template("gemma").render([S("Be kind."), U(" hi ")], "</s>", "<s>") == (
        "<s><start_of_turn>user\nBe kind.\n\nhi<end_of_turn>\n"
    )


# --- labels, by template ------------------------------------------------------------------------


def _trained(template, msgs, tools=None) -> list[str]:
    return [s.text for s in template.segments(msgs, "</s>", "<s>", tools=tools) if s.trained]


def test_llama3_labels_and_system_header():
    llama3 = get_template("llama3")
    msgs, tools = TOOL_USE["one-call"]
    assert _trained(llama3, msgs, tools) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "22 °C.<|eot_id|>",
    ]
    text = llama3.render(msgs, "</s>", "<s>", tools=tools)
    assert text.startswith(
        "<s><|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou help with weather.<|eot_id|>"
    )
    # the first user message follows the tool list; a tool result is JSON under the ipython header
    assert '    "type": "function",\n    "function": {' in text and "\n\nWeather in Paris?<|eot_id|>" in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n"22"<|eot_id|>' in text


def test_llama3_refuses_what_its_template_cannot_render():
    llama3 = get_template("llama3")
    with pytest.raises(ValueError, match="single tool-calls"):
        llama3.render(*PARALLEL["parallel"][:1], "</s>", tools=TOOLS)
    with pytest.raises(ValueError, match="would be lost"):
        llama3.render([U("Paris?"), A("Let me look.", calls=(PARIS,))], "</s>", tools=TOOLS)
    with pytest.raises(ValueError, match="'llama3' has no format for reasoning.*qwen3"):
        llama3.render([U("2+2?"), A("4", reasoning="add")], "</s>")


def test_qwen3_reasoning_policy_and_past_reasoning():
    msgs = REASONING["past-and-last"][0]
    train, context = get_template("qwen3"), get_template("qwen3", reasoning="context")
    text = train.render(msgs, "</s>")
    assert "Add." not in text  # before the last user query: dropped, as Qwen3's template does
    assert text.endswith("<|im_start|>assistant\n<think>\nAdd again.\n</think>\n\n6<|im_end|>\n")
    assert _trained(train, msgs) == ["4<|im_end|>", "<think>\nAdd again.\n</think>\n\n6<|im_end|>"]
    assert _trained(context, msgs) == ["4<|im_end|>", "6<|im_end|>"]
    assert context.render(msgs, "</s>") == text
    assert train.chat_template != context.chat_template  # so the tokenized-data cache key differs
    # the last reply always has a think block, empty without reasoning
    assert train.render([U("hi"), A("hello")], "</s>").endswith("<think>\n\n</think>\n\nhello<|im_end|>\n")


def test_qwen3_generation_prompt_thinking_on_and_off(bpe_tokenizer):
    qwen3, msgs = get_template("qwen3"), [U("hi")]
    assert qwen3.render(msgs, "</s>", add_generation_prompt=True).endswith("<|im_start|>assistant\n")
    off = qwen3.render(msgs, "</s>", add_generation_prompt=True, thinking=False)
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    published = _published(bpe_tokenizer, fixture("qwen3"), msgs, None, True, enable_thinking=False)
    assert off == published
    ids = encode_prompt(bpe_tokenizer, qwen3, msgs, thinking=False)
    assert ids == bpe_tokenizer(off, add_special_tokens=False)["input_ids"]


def test_mistral_tool_calls_and_system_placement():
    mistral = get_template("mistral")
    msgs, tools = TOOL_USE["one-call"]
    assert _trained(mistral, msgs, tools) == [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call12345"}]</s>',
        " 22 °C.</s>",
    ]
    text = mistral.render(msgs, "</s>", "<s>", tools=tools)
    assert '[TOOL_RESULTS] {"content": 22, "call_id": "call12345"}[/TOOL_RESULTS]' in text
    # the system message goes into the last user turn only when that turn ends the conversation
    assert "You help with weather." not in text
    prompt = mistral.render(msgs[:2], "</s>", "<s>", tools=tools)
    assert prompt.endswith("[/AVAILABLE_TOOLS][INST] You help with weather.\n\nWeather in Paris?[/INST]")
    with pytest.raises(ValueError, match="length 9"):
        mistral.render([U("Paris?"), A("", calls=(ToolCall("get_weather", {}, "c1"),))], "</s>")


def test_templates_without_a_format_refuse_tools_and_reasoning():
    for name in ("openchatkit", "alpaca", "chatml", "llama2", "gemma"):
        t = get_template(name)
        with pytest.raises(ValueError, match=rf"'{name}' has no format for .*(llama3|qwen3)"):
            t.render([U("Paris?"), A("", calls=(PARIS,))], "</s>")
        with pytest.raises(ValueError, match=rf"'{name}' has no format for"):
            t.render([U("x"), A("y", reasoning="r")], "</s>")
        with pytest.raises(ValueError, match=rf"'{name}' has no format for"):
            t.render([U("hi")], "</s>", tools=TOOLS)
    with pytest.raises(ValueError, match=r"'alpaca' has no format for a tool result \(messages\[2\]\)"):
        get_template("alpaca").render([U("a"), A("b"), T("c")], "</s>")


def test_reasoning_policy_is_checked():
    with pytest.raises(ValueError, match="train, context"):
        get_template("qwen3", reasoning="drop")
    with pytest.raises(ValueError, match="'hf' cannot apply reasoning policy 'context'"):
        get_template("hf", _with_template(_llama_tok(), fixture("llama3")), reasoning="context")


# --- hf: tools and reasoning go to the tokenizer's own template -----------------------------------


def _llama_tok():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", bos_token="<s>", unk_token="[UNK]"
    )


def _with_template(tok, template: str):
    tok.chat_template = template
    return tok


def test_hf_passes_tools_and_tool_messages_to_the_tokenizer_template():
    # Llama 3.1's published template is prefix-stable, so `hf` can segment it: it agrees with llama3
    # (without a system message: rendering it alone with tools, the template finds no user message)
    hf = get_template("hf", _with_template(_llama_tok(), fixture("llama3")))
    msgs, tools = TOOL_USE["one-call"]
    msgs = msgs[1:]
    assert hf.render(msgs, "</s>", "<s>", tools=tools) == get_template("llama3").render(
        msgs, "</s>", "<s>", tools=tools
    )
    assert _trained(hf, msgs, tools) == [
        '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
        "22 °C.<|eot_id|>",
    ]


def test_hf_passes_reasoning_as_reasoning_content():
    tok = _with_template(
        _llama_tok(),
        "{% for m in messages %}{% if m.reasoning_content %}<r>{{ m.reasoning_content }}</r>{% endif %}"
        "{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}{% if enable_thinking is false %}NT{% endif %}"
        "{% endif %}",
    )
    hf = get_template("hf", tok)
    assert _trained(hf, [U("q"), A("a", reasoning="why")]) == ["<r>why</r>a\n"]
    assert hf.render([U("q")], "</s>", add_generation_prompt=True, thinking=False) == "q\nNT"


# --- data: a reply of tool calls alone is not an empty message ------------------------------------


def test_fit_conversation_keeps_tool_call_replies_and_renders_tools(bpe_tokenizer):
    conv = parse_conversation(
        {
            "messages": [
                {"role": "user", "content": "Weather in Paris?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call12345",
                            "type": "function",
                            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call12345", "content": "22"},
                {"role": "assistant", "content": "22 °C.", "reasoning_content": "It said 22."},
            ],
            "tools": TOOLS,
        }
    )
    qwen3 = get_template("qwen3")
    enc, outcome = fit_conversation(bpe_tokenizer, qwen3, conv.messages, 4096, "drop", conv.tools)
    assert outcome == "ok"
    assert enc == encode_conversation(bpe_tokenizer, qwen3, conv.messages, conv.tools)
    text = bpe_tokenizer.decode(enc.input_ids)
    assert '"name": "get_weather"' in text and "<think>\nIt said 22.\n</think>" in text
    _, outcome = fit_conversation(bpe_tokenizer, qwen3, (U("hi"), A("  ")), 4096, "drop")
    assert outcome == "empty_message"
