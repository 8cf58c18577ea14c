"""The `hf` chat template: a base model's own Jinja `chat_template`, turned into labelled segments.

For models whose format chatkit does not define, the tokenizer's template is the format. Labels still
come per message: each message's segment is the text that adding it appends to the rendering of the
conversation so far (for an assistant message, the generation prompt untrained and the rest trained).
That needs a prefix-stable template (rendering k messages is a prefix of rendering k + 1); one that is
not raises instead of silently mislabelling.

Tools, tool calls, tool results and reasoning go to the tokenizer's template as transformers passes
them (`tools=`, OpenAI-shaped messages, reasoning as `reasoning_content`); a reply's reasoning is part of
what its message appends, so it is trained with the reply (the `context` policy needs a template that
knows where reasoning ends: qwen3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatkit.conversation import Message
from chatkit.templates.base import HF_TEMPLATE, REASONING_POLICIES, Segment, Tools, hf_message
from chatkit.templates.replies import Reply, ReplyFormat, format_of_jinja


def _appended(before: str, after: str, what: str) -> str:
    """The text `after` adds to `before`; a template that rewrites earlier text cannot be segmented."""
    if not after.startswith(before):
        raise ValueError(
            f"the tokenizer's chat_template is not prefix-stable: {what} changes the text rendered before "
            f"it ({before[-60:]!r} is not a prefix of {after[: len(before) + 20][-80:]!r}); "
            "use a named chatkit template instead (chatkit.templates.list_templates())"
        )
    return after[len(before) :]


@dataclass(frozen=True, eq=False)
class HFChatTemplate:
    """A `Template` rendering with `tokenizer.apply_chat_template` (the registry's `hf`)."""

    tokenizer: Any
    """A Hugging Face tokenizer whose `chat_template` defines the format."""
    name: str = HF_TEMPLATE
    stop_strings: tuple[str, ...] = ()
    """None known: the eos token (and the model's generation_config) ends replies."""
    default_system: str | None = None
    special_tokens: tuple[str, ...] = ()
    """The tokenizer already holds its template's markers."""
    description: str = "the base tokenizer's own chat_template"
    reasoning: str = "train"
    """Only `train`: reasoning is trained with its reply (see the module docstring)."""

    def __post_init__(self) -> None:
        if self.reasoning != "train":
            allowed = "train" if self.reasoning in REASONING_POLICIES else ", ".join(REASONING_POLICIES)
            raise ValueError(
                f"chat template 'hf' cannot apply reasoning policy {self.reasoning!r} (it has {allowed}): "
                "it cannot tell where the tokenizer's template puts reasoning; use qwen3 for 'context'"
            )
        template = getattr(self.tokenizer, "chat_template", None)
        if not isinstance(template, str) or not template.strip():
            raise ValueError(
                "chat template 'hf' needs a tokenizer with a chat_template, and this one has none; "
                "pick a named chatkit template instead (chatkit.templates.list_templates())"
            )

    @property
    def chat_template(self) -> str:
        """The tokenizer's own Jinja template (exported as it is)."""
        return self.tokenizer.chat_template

    def _render(
        self,
        messages: Sequence[Message],
        eos: str,
        bos: str,
        generation_prompt: bool,
        tools: Tools | None,
        thinking: bool | None,
    ) -> str:
        if not messages:  # transformers refuses an empty conversation; it renders as nothing
            return ""
        extra = {} if thinking is None else {"enable_thinking": thinking}
        return self.tokenizer.apply_chat_template(
            [hf_message(m) for m in messages],
            tools=[dict(t) for t in tools] if tools else None,
            tokenize=False,
            add_generation_prompt=generation_prompt,
            eos_token=eos,
            bos_token=bos,
            **extra,
        )

    def segments(
        self,
        messages: Sequence[Message],
        eos_token: str,
        bos_token: str = "",
        add_generation_prompt: bool = False,
        *,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> list[Segment]:
        """Render growing prefixes of the conversation; each message's segment is what it appends."""
        msgs = list(messages)
        segs: list[Segment] = []
        done = ""

        def render(upto: list[Message], generation_prompt: bool) -> str:
            return self._render(upto, eos_token, bos_token, generation_prompt, tools, thinking)

        for k, m in enumerate(msgs):
            if m.role == "assistant":
                prompt = render(msgs[:k], True)
                segs.append(
                    Segment(_appended(done, prompt, f"the generation prompt before message {k}"), False)
                )
                done = prompt
            full = render(msgs[: k + 1], False)
            segs.append(Segment(_appended(done, full, f"message {k} ({m.role})"), m.trained))
            done = full
        if add_generation_prompt:
            prompt = render(msgs, True)
            segs.append(Segment(_appended(done, prompt, "the generation prompt"), False))
        return [s for s in segs if s.text]

    def render(
        self,
        messages: Sequence[Message],
        eos_token: str,
        bos_token: str = "",
        add_generation_prompt=False,
        *,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> str:
        segs = self.segments(
            messages, eos_token, bos_token, add_generation_prompt, tools=tools, thinking=thinking
        )
        return "".join(s.text for s in segs)

    def reply_text(self, generated: str) -> str:
        """Generated text is the message content as it is (the template's own head is unknown)."""
        return generated

    @property
    def reply_format(self) -> ReplyFormat:
        """Guessed from the Jinja: Qwen's <tool_call> blocks, Mistral's [TOOL_CALLS], Llama 3.1's JSON
        after <|python_tag|>, <think> reasoning, when the template writes them; else none."""
        return format_of_jinja(self.chat_template)

    def parse_reply(self, generated: str, tools: bool = True) -> Reply:
        """(content, tool_calls, reasoning) as `reply_format` reads them."""
        return self.reply_format.parse(generated, tools)
