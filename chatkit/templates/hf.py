"""The `hf` chat template: a base model's own Jinja `chat_template`, turned into labelled segments.

For models whose format chatkit does not define, the tokenizer's template is the format. Labels still
come per message: each message's segment is the text that adding it appends to the rendering of the
conversation so far (for an assistant message, the generation prompt untrained and the rest trained).
That needs a prefix-stable template (rendering k messages is a prefix of rendering k + 1); one that is
not raises instead of silently mislabelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from chatkit.conversation import Message
from chatkit.templates.base import HF_TEMPLATE, Segment


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

    def __post_init__(self) -> None:
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

    def _render(self, messages: Sequence[Message], eos: str, bos: str, generation_prompt: bool) -> str:
        if not messages:  # transformers refuses an empty conversation; it renders as nothing
            return ""
        return self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            tokenize=False,
            add_generation_prompt=generation_prompt,
            eos_token=eos,
            bos_token=bos,
        )

    def segments(
        self,
        messages: Sequence[Message],
        eos_token: str,
        bos_token: str = "",
        add_generation_prompt: bool = False,
    ) -> list[Segment]:
        """Render growing prefixes of the conversation; each message's segment is what it appends."""
        msgs = list(messages)
        segs: list[Segment] = []
        done = ""
        for k, m in enumerate(msgs):
            if m.role == "assistant":
                prompt = self._render(msgs[:k], eos_token, bos_token, True)
                segs.append(
                    Segment(_appended(done, prompt, f"the generation prompt before message {k}"), False)
                )
                done = prompt
            full = self._render(msgs[: k + 1], eos_token, bos_token, False)
            segs.append(Segment(_appended(done, full, f"message {k} ({m.role})"), m.trained))
            done = full
        if add_generation_prompt:
            prompt = self._render(msgs, eos_token, bos_token, True)
            segs.append(Segment(_appended(done, prompt, "the generation prompt"), False))
        return [s for s in segs if s.text]

    def render(
        self, messages: Sequence[Message], eos_token: str, bos_token: str = "", add_generation_prompt=False
    ) -> str:
        return "".join(s.text for s in self.segments(messages, eos_token, bos_token, add_generation_prompt))

    def reply_text(self, generated: str) -> str:
        """Generated text is the message content as it is (the template's own head is unknown)."""
        return generated
