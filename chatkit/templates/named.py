"""chatkit's own chat templates: one definition each, from which both the training renderer and the
exported Hugging Face Jinja `chat_template` are generated, so training and inference cannot drift apart.

A template is a set of pieces. `{content}` marks where a message's text goes; `{eos}` and `{bos}` stand
for the tokenizer's special tokens (Jinja's `eos_token`/`bos_token`). Rendering yields *segments*,
each flagged trained or not, so labels are built per message at tokenization time instead of by
searching the rendered string for markers.

Each template below cites the origin whose text it reproduces; `chatkit.templates` registers them all
(`NAMED_TEMPLATES`) under their names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from chatkit.conversation import Message
from chatkit.templates.base import Segment, Tools, refuse_tools_and_reasoning
from chatkit.templates.replies import PLAIN, Reply, ReplyFormat

_PLACEHOLDERS = {"{eos}": "eos_token", "{bos}": "bos_token"}
_CONTENT = "message['content']"


@dataclass(frozen=True)
class ChatTemplate:
    """A template defined by its pieces (a `Template`); renders as the pieces say, and as Jinja."""

    name: str
    """Registry name, stored in every exported model folder."""
    system: str = "{content}\n"
    """Whole piece for a system message."""
    user: str = "{content}\n"
    """Whole piece for a user message."""
    assistant_prefix: str = ""
    """Opens an assistant turn; also the generation prompt. Never trained."""
    assistant: str = "{content}{eos}"
    """The trained part of an assistant turn: content plus the end of turn, so the model learns to stop."""
    separator: str = ""
    """Untrained text after each assistant turn (after the stop, so the model never generates it)."""
    bos: str = ""
    """Text that opens every conversation."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a reply besides the eos token (e.g. a hallucinated next user turn)."""
    default_system: str | None = None
    """System message used when a conversation has none."""
    description: str = ""
    user_after_system: str | None = None
    """Piece for a user message right after a system message (llama2 opens [INST] in the system piece)."""
    special_tokens: tuple[str, ...] = ()
    """Marker strings a tokenizer must hold as special tokens (one id each, never split), e.g. ChatML's."""
    strip_content: bool = False
    """Strip whitespace around every message's text, as origins that call `.strip()` (Meta's llama2) do."""
    assistant_before_user: str | None = None
    """The trained piece for an assistant message followed by a user message (None: `assistant`, then
    `separator`). Lets a past reply end with the next turn's marker as its trained stop, where the
    origin's history has no end-of-turn token (openchatkit: " {content}\n<human>:")."""
    user_after_assistant: str | None = None
    """Piece for a user message right after an assistant message whose `assistant_before_user` piece
    already holds the user turn's marker (None: `user`)."""
    separator_after_last: bool = True
    """Whether `separator` also follows an assistant message that ends the conversation; False leaves
    no untrained text after the final reply's stop token (alpaca)."""

    def _fill(self, piece: str, content: str, eos: str, bos: str) -> str:
        # replace, not str.format: message content may contain braces.
        return piece.replace("{eos}", eos).replace("{bos}", bos).replace("{content}", content)

    def _with_default_system(self, messages: Sequence[Message]) -> list[Message]:
        msgs = list(messages)
        if self.default_system is not None and (not msgs or msgs[0].role != "system"):
            msgs.insert(0, Message("system", self.default_system))
        return msgs

    def _piece(self, role: str, prev_role: str | None) -> str:
        """The piece for a system or user message, given the role of the message before it."""
        if role == "system":
            return self.system
        if prev_role == "system" and self.user_after_system is not None:
            return self.user_after_system
        if prev_role == "assistant" and self.assistant_before_user is not None:
            return self.user if self.user_after_assistant is None else self.user_after_assistant
        return self.user

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
        """Render messages as segments; a segment is trained when its message is. These formats have no
        tool calls, tool results or reasoning: a conversation with any is refused, naming a template
        that has them (`thinking` is accepted and means nothing here)."""
        refuse_tools_and_reasoning(self.name, messages, tools)

        def fill(piece: str, content: str = "") -> str:
            return self._fill(piece, content, eos_token, bos_token)

        segs = [Segment(fill(self.bos), False)] if self.bos else []
        prev_role = None
        msgs = self._with_default_system(messages)
        for i, m in enumerate(msgs):
            text = m.content.strip() if self.strip_content else m.content
            if m.role == "assistant":
                last = i == len(msgs) - 1
                segs.append(Segment(fill(self.assistant_prefix), False))
                if not last and msgs[i + 1].role == "user" and self.assistant_before_user is not None:
                    segs.append(Segment(fill(self.assistant_before_user, text), m.trained))
                else:
                    segs.append(Segment(fill(self.assistant, text), m.trained))
                    if not last or self.separator_after_last:
                        segs.append(Segment(fill(self.separator), False))
            else:
                segs.append(Segment(fill(self._piece(m.role, prev_role), text), m.trained))
            prev_role = m.role
        if add_generation_prompt:
            segs.append(Segment(fill(self.assistant_prefix), False))
        return [s for s in segs if s.text]

    def reply_text(self, generated: str) -> str:
        """Recover a message's content from generated text (drops the piece's literal head, e.g. a space)."""
        head = self.assistant.split("{content}", 1)[0]
        text = generated[len(head) :] if head and generated.startswith(head) else generated
        return text.strip() if self.strip_content else text

    @property
    def reply_format(self) -> ReplyFormat:
        """No reasoning nor tool calls: these templates have no format for them."""
        return PLAIN

    def parse_reply(self, generated: str, tools: bool = True) -> Reply:
        """The reply is its content, unchanged."""
        return Reply(generated)

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

    def _expr(self, piece: str) -> str:
        """A piece as a Jinja expression of the current `message` (trimmed when the origin strips)."""
        return _jinja_piece(piece, _CONTENT + "|trim" if self.strip_content else _CONTENT)

    def _jinja_user(self) -> str:
        """The user branch, chosen by the message before: `user_after_system` after a system message
        (or the default one), `user_after_assistant` after a reply that holds the user marker."""
        plain = "{{- " + self._expr(self.user) + " -}}"
        prev = "messages[loop.index0 - 1]['role']"
        branches: list[tuple[str, str]] = []
        if self.user_after_system is not None:
            after_system = f"(loop.index0 > 0 and {prev} == 'system')"
            if self.default_system is not None:  # the default system message goes before messages[0]
                after_system = "loop.first or " + after_system
            branches.append((after_system, self.user_after_system))
        if self.assistant_before_user is not None and self.user_after_assistant is not None:
            branches.append((f"(loop.index0 > 0 and {prev} == 'assistant')", self.user_after_assistant))
        if not branches:
            return plain
        out = ""
        for k, (cond, piece) in enumerate(branches):
            out += ("{%- if " if k == 0 else "{%- elif ") + cond + " -%}{{- " + self._expr(piece) + " -}}"
        return out + "{%- else -%}" + plain + "{%- endif -%}"

    def _jinja_assistant(self) -> str:
        # The whole trained piece, its literal head (e.g. a space) included, is the {% generation %}
        # region: transformers marks every token overlapping the region, and chatkit trains every token
        # overlapping a trained segment (chatkit/tokenization.py), so the two agree token for token,
        # also when the head's space is a token of its own or merges into the reply's first word.
        def turn(piece: str, separator: bool) -> str:
            sep = "{{- " + self._expr(self.separator) + " -}}" if separator and self.separator else ""
            return "{%- generation -%}{{- " + self._expr(piece) + " -}}{%- endgeneration -%}" + sep

        prefix = "{{- " + self._expr(self.assistant_prefix) + " -}}"
        if self.separator_after_last:
            plain = turn(self.assistant, True)
        else:
            plain = (
                "{%- if loop.last -%}"
                + turn(self.assistant, False)
                + "{%- else -%}"
                + turn(self.assistant, True)
            )
            plain += "{%- endif -%}"
        if self.assistant_before_user is None:
            return prefix + plain
        before_user = "(not loop.last and messages[loop.index0 + 1]['role'] == 'user')"
        return (
            prefix
            + "{%- if "
            + before_user
            + " -%}"
            + turn(self.assistant_before_user, False)
            + "{%- else -%}"
            + plain
            + "{%- endif -%}"
        )

    @property
    def chat_template(self) -> str:
        """The Hugging Face Jinja template equivalent to `render` (tests check they agree)."""
        sys_expr = self._expr(self.system)
        parts = []
        if self.bos:
            parts.append("{{- " + self._expr(self.bos) + " -}}")
        if self.default_system is not None:
            default = json.dumps(self.default_system)
            parts.append(
                "{%- if messages|length == 0 or messages[0]['role'] != 'system' -%}"
                "{{- " + sys_expr.replace(_CONTENT, default) + " -}}{%- endif -%}"
            )
        parts.append(
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'system' -%}{{- " + sys_expr + " -}}"
            "{%- elif message['role'] == 'user' -%}"
            + self._jinja_user()
            + "{%- elif message['role'] == 'assistant' -%}"
            + self._jinja_assistant()
            + "{%- endif -%}{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{- " + self._expr(self.assistant_prefix) + " -}}{%- endif -%}"
        )
        return "".join(parts)


def _jinja_piece(piece: str, content: str = _CONTENT) -> str:
    """A Jinja expression for a piece: literals joined with `~`, placeholders as variables."""
    exprs: list[str] = []
    rest = piece
    while rest:
        hits = [(rest.find(p), p) for p in (*_PLACEHOLDERS, "{content}") if p in rest]
        if not hits:
            exprs.append(json.dumps(rest))
            break
        pos, ph = min(hits)
        if pos:
            exprs.append(json.dumps(rest[:pos]))
        exprs.append(content if ph == "{content}" else _PLACEHOLDERS[ph])
        rest = rest[pos + len(ph) :]
    return " ~ ".join(exprs) if exprs else '""'


# OpenChatKit (Together): "<human>: ...\n<bot>: ...\n<human>: ...\n<bot>:" is the text of OIG's training
# documents (LAION-AI/Open-Instruction-Generalist) and of OpenChatKit's bot (togethercomputer/OpenChatKit
# inference/conversation.py: push_model_response appends `<bot>: {response}\n`, with no eos; training
# joins whole documents with <|endoftext|> between them). chatkit trains only the replies, so each
# reply's stop signal must be a trained token of the reply, without changing the history's text:
# - a reply followed by a user turn ends with that turn's marker, trained: " {reply}\n<human>:". The
#   model learns to close a reply by opening the next human turn, which the bot stops on, as
#   OpenChatKit's bot.py does ("<human>:" is a stop string);
# - a conversation's final reply ends with the eos, trained, as the origin's documents do.
# The history a chat feeds back is then exactly OpenChatKit's. Leaving the past replies with no
# trained stop at all was tried and broke multi-turn chat (the demo model ran on past them).
# A row ends with "\n" after its last eos, untrained and last in its segment (so it changes no loss):
# the demo's tokenizer is trained on these rows, and without it the demo's addition fell from 25/25 to
# 10/25 held out.
OPENCHATKIT = ChatTemplate(
    name="openchatkit",
    system="{content}\n",
    user="<human>: {content}\n",
    assistant_prefix="<bot>:",
    assistant=" {content}{eos}",
    separator="\n",
    assistant_before_user=" {content}\n<human>:",
    user_after_assistant=" {content}\n",
    stop_strings=("<human>:",),
    description="OpenChatKit's <human>:/<bot>: format",
)

# OpenAlpaca, as released 2023-05-27 (yxuansu/OpenAlpaca datasets/sft_dataset.py PROMPT_DICT and
# README.md): Stanford Alpaca's prompts, preamble included (the first release, 2023-05-04, had
# dropped the preamble and put ### Input: before ### Instruction:; the 05-27 models went back).
# Training was [bos] + prompt + reply + [eos] with prompt and reply encoded separately, so
# SentencePiece gave the reply a leading "▁": as text, "### Response: {reply}</s>".
ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
ALPACA_INPUT_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)
ALPACA = ChatTemplate(
    name="alpaca",
    bos="{bos}",
    system="{content}\n\n",
    user="### Instruction:\n{content}\n\n",
    assistant_prefix="### Response:",
    assistant=" {content}{eos}",
    # Multi-turn (not in the origin): each next instruction follows the reply after a blank
    # line, the blank line that separates every section of the prompt. Nothing follows the final
    # reply's eos: OpenAlpaca's rows end with [eos].
    separator="\n\n",
    separator_after_last=False,
    stop_strings=("### Instruction:",),
    default_system=ALPACA_PREAMBLE,
    description="OpenAlpaca / Stanford Alpaca ### Instruction: / ### Response: prompt",
)


def alpaca_messages(instruction: str, input: str, output: str) -> list[Message]:
    """An Alpaca row as messages that the `alpaca` template renders exactly as OpenAlpaca's prompts.

    A row with an input becomes user content `f"{instruction}\\n\\n### Input:\\n{input}"` plus the
    input preamble as system message, so the pieces render OpenAlpaca's `prompt_input` verbatim.
    """
    if not input:
        return [Message("user", instruction), Message("assistant", output)]
    return [
        Message("system", ALPACA_INPUT_PREAMBLE),
        Message("user", f"{instruction}\n\n### Input:\n{input}"),
        Message("assistant", output),
    ]


# Koala (young-geng/EasyLM docs/koala.md serving flags, composed by EasyLM/serving.py process_chat):
# chat_prepend_text="BEGINNING OF CONVERSATION: ", chat_user_prefix="USER: ", chat_user_suffix=" ",
# chat_lm_prefix="GPT:", chat_lm_suffix="</s>"; FastChat's koala_v1 renders the same text with
# "GPT: {reply}". Koala has no system prompt; one given goes after the header.
KOALA = ChatTemplate(
    name="koala",
    bos="{bos}BEGINNING OF CONVERSATION: ",
    system="{content} ",
    user="USER: {content} ",
    assistant_prefix="GPT:",
    assistant=" {content}{eos}",
    stop_strings=("USER:",),
    description="Koala (EasyLM): BEGINNING OF CONVERSATION: USER: ... GPT: ...</s>",
)

# Llama 2 chat (meta-llama/llama llama/generation.py chat_completion): each exchange is
# encode(f"{B_INST} {user.strip()} {E_INST} {answer.strip()} ", bos=True, eos=True), the system
# prompt is B_SYS + system + E_SYS inside the first [INST], and the prompt ends "[INST] {user} [/INST]".
# Hugging Face's meta-llama/Llama-2-*-chat-hf chat_template renders the same text. Meta strips the
# joined first turn; we strip each message (the text differs only when the system message or the
# first user message has surrounding whitespace).
LLAMA2 = ChatTemplate(
    name="llama2",
    system="{bos}[INST] <<SYS>>\n{content}\n<</SYS>>\n\n",
    user_after_system="{content} [/INST]",
    user="{bos}[INST] {content} [/INST]",
    assistant=" {content} {eos}",
    strip_content=True,
    stop_strings=("[INST]",),
    description="Meta's Llama 2 chat: <s>[INST] <<SYS>>...<</SYS>> ... [/INST] ... </s>",
)

# Vicuna v1.1 (lm-sys/FastChat fastchat/conversation.py "vicuna_v1.1", SeparatorStyle.ADD_COLON_TWO,
# sep=" ", sep2="</s>"): "{system} USER: {user} ASSISTANT: {reply}</s>USER: ... ASSISTANT:".
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
VICUNA = ChatTemplate(
    name="vicuna",
    bos="{bos}",
    system="{content} ",
    user="USER: {content} ",
    assistant_prefix="ASSISTANT:",
    assistant=" {content}{eos}",
    stop_strings=("USER:",),
    default_system=VICUNA_SYSTEM,
    description="FastChat vicuna_v1.1: {system} USER: ... ASSISTANT: ...</s>",
)

# ChatML v0 (openai/openai-python chatml.md): "<|im_start|>{role}\n{content}<|im_end|>\n". The
# generation prompt "<|im_start|>assistant\n" is the one Hugging Face ChatML templates use. The
# reply's end is <|im_end|> (trained, and a stop string), not the tokenizer's eos.
CHATML = ChatTemplate(
    name="chatml",
    system="<|im_start|>system\n{content}<|im_end|>\n",
    user="<|im_start|>user\n{content}<|im_end|>\n",
    assistant_prefix="<|im_start|>assistant\n",
    assistant="{content}<|im_end|>",
    separator="\n",
    stop_strings=("<|im_end|>",),
    special_tokens=("<|im_start|>", "<|im_end|>"),
    description="OpenAI's ChatML: <|im_start|>role\\n...<|im_end|>",
)


NAMED_TEMPLATES: tuple[ChatTemplate, ...] = (OPENCHATKIT, ALPACA, KOALA, LLAMA2, VICUNA, CHATML)
"""Every named template, in registration order."""
