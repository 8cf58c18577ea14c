"""The chat engine behind the shell bot, the demo's evaluator and (later) the server.

It renders the conversation with the same template and the same segment-wise tokenization used in
training, decodes with a KV cache, stops at the eos token or any of the template's stop strings, and
streams text without ever showing part of a stop string.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from chatkit.conversation import Message
from chatkit.templates import ChatTemplate, get_template
from chatkit.tokenization import encode_prompt
from chatkit.trainer_meta import read_meta


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    """Most tokens in one reply."""
    sample: bool = True
    """Sample (True) or decode greedily (False)."""
    temperature: float = 0.6
    top_k: int = 40
    top_p: float = 1.0

    def as_dict(self) -> dict[str, float | int | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(device)


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters could be the start of a stop string (so must not be shown yet)."""
    hold = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                hold = max(hold, n)
                break
    return hold


class ReplyAssembler:
    """Turns generated token ids into the reply text, piece by piece.

    A piece is shown only once it is certain: never part of a stop string, never an incomplete UTF-8
    sequence, never trailing whitespace that a following stop string would remove. The pieces join to
    exactly the final reply, which is the message content (the template's literal head removed).
    """

    def __init__(self, tokenizer, template: ChatTemplate):
        self.tokenizer, self.template = tokenizer, template
        self.stop_strings = tuple(template.stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the newly certain text (maybe empty)."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=False)
        cut = min((text.find(s) for s in self.stop_strings if s in text), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut].rstrip(), True
            return ""
        self.text = text
        visible = self.template.reply_text(text[: len(text) - _stop_holdback(text, self.stop_strings)])
        if visible.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its next bytes
            visible = visible[:-1]
        return self._show(visible.rstrip())

    def finish(self) -> str:
        """The rest of the reply once generation has ended."""
        return self._show(self.template.reply_text(self.text))

    def _show(self, visible: str) -> str:
        if len(visible) <= self.shown:
            return ""
        piece, self.shown = visible[self.shown :], len(visible)
        return piece

    @property
    def reply(self) -> str:
        return self.template.reply_text(self.text)


def _next_token(logits: torch.Tensor, p: GenerationParams, generator: torch.Generator | None) -> int:
    """logits (V,) -> token id, greedy or by temperature/top-k/top-p sampling."""
    if not p.sample or p.temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / p.temperature
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        cut = sorted_p.cumsum(0) - sorted_p > p.top_p
        sorted_p[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, idx, sorted_p)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


class ChatEngine:
    def __init__(self, model, tokenizer, template: ChatTemplate, device: torch.device | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template
        self.device = device or next(model.parameters()).device
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )

    @classmethod
    def from_pretrained(
        cls, path: str | Path, template: str | None = None, device: str = "auto", dtype: str | None = None
    ) -> ChatEngine:
        """Load a Hugging Face folder; the template defaults to the one recorded at export."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        dev = pick_device(device)
        name = template or read_meta(path).get("template")
        if name is None:
            raise ValueError(f"{path}: no chatkit.json naming its chat template; pass --template")
        if dtype is None:
            dtype = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev)
        return cls(model, tokenizer, get_template(name, tokenizer), dev)

    def prompt_ids(self, messages: Sequence[Message], max_new_tokens: int) -> list[int]:
        """Encode the prompt, dropping the oldest whole turns (never the system prompt) to fit."""
        msgs = list(messages)
        while True:
            ids = encode_prompt(self.tokenizer, self.template, msgs)
            if len(ids) + max_new_tokens <= self.context_length:
                return ids
            first = 1 if msgs and msgs[0].role == "system" else 0
            # Drop the first user turn and the replies that follow it, keeping the last user turn.
            nxt = next((i for i in range(first + 1, len(msgs)) if msgs[i].role == "user"), None)
            if nxt is None:
                raise ValueError(
                    f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) does not fit "
                    f"the model's context of {self.context_length} tokens"
                )
            msgs = msgs[:first] + msgs[nxt:]

    def raw_prompt(self, messages: Sequence[Message]) -> str:
        eos, bos = self.tokenizer.eos_token, self.tokenizer.bos_token or ""
        return self.template.render(messages, eos, bos, add_generation_prompt=True)

    @torch.inference_mode()
    def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams | None = None,
        seed: int | None = None,
    ) -> Iterator[str]:
        """Yield pieces of the reply as they become certain; their concatenation is the reply."""
        p = params or GenerationParams()
        gen = torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None
        ids = self.prompt_ids(messages, p.max_new_tokens)
        input_ids = torch.tensor([ids], device=self.device)
        reply = ReplyAssembler(self.tokenizer, self.template)
        past = None
        for _ in range(p.max_new_tokens):
            out = self.model(input_ids=input_ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = _next_token(out.logits[0, -1].cpu(), p, gen)
            if tok in self.eos_ids:
                break
            piece = reply.push(tok)
            if piece:
                yield piece
            if reply.stopped:
                break
            input_ids = torch.tensor([[tok]], device=self.device)
        piece = reply.finish()
        if piece:
            yield piece

    def reply(self, messages: Sequence[Message], params: GenerationParams | None = None, seed=None) -> str:
        return "".join(self.stream(messages, params, seed))
