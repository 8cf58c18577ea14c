"""The chat engine behind the shell bot, the server, the demo's evaluator and the retrieval path.

It renders the conversation with the same template and the same segment-wise tokenization used in
training, decodes with a KV cache, stops at the eos token or any of the template's stop strings, and
streams text without ever showing part of a stop string or of a character. Sampling runs in float32
whatever the model's dtype (fp16 logits overflow to NaN/inf); non-finite logits raise
`GenerationError`.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from chatkit.conversation import Message
from chatkit.io import read_meta
from chatkit.quiet import no_progress_bars
from chatkit.templates import ChatTemplate, Tools, get_template
from chatkit.tokenization import encode_prompt, special_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class GenerationError(RuntimeError):
    """Generation cannot go on (e.g. the model produced NaN or infinite logits)."""


@dataclass
class GenerationParams:
    """How to generate a reply. The defaults here are every tool's defaults: the bot's and the
    server's flags, and so the API's and the web page's (`chatkit.bot.add_generation_args`)."""

    max_new_tokens: int = 128
    """Most tokens in one reply."""
    sample: bool = True
    """Sample (True) or decode greedily (False)."""
    temperature: float = 0.6
    top_k: int = 40
    top_p: float = 1.0

    def as_dict(self) -> dict[str, float | int | bool]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class StreamInfo:
    """What one generation did; filled in by `ChatEngine.stream`/`complete` as they run."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    """"stop" (eos or a stop string), "length" (max_new_tokens reached) or "cancelled"."""


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


_UTF8_MAX_TAIL = 3
"""Tokens worth holding back for a character to complete: an unfinished UTF-8 character has at most 3
bytes, each token at least one. A U+FFFD still there after more is made of bytes that are no
character at all (a model can produce any byte): shown as the tokenizer decodes them."""


class ReplyAssembler:
    """Turns generated token ids into the reply text, piece by piece.

    A piece is shown only once it is certain: never part of a stop string, never an incomplete UTF-8
    sequence, never trailing whitespace that a following stop string would remove. The pieces join to
    exactly the final reply, which is the message content (the template's literal head removed).
    `template=None` assembles raw text (no head removed); `extra_stops` add to the template's stops.
    """

    def __init__(self, tokenizer, template: ChatTemplate | None, extra_stops: Sequence[str] = ()):
        self.tokenizer, self.template = tokenizer, template
        stops = tuple(template.stop_strings) if template is not None else ()
        self.stop_strings = stops + tuple(s for s in extra_stops if s and s not in stops)
        self.ids: list[int] = []
        self.text = ""
        self.shown = 0
        self.stopped = False
        # Incremental detokenization (as vLLM and TGI do): decode only ids[_prefix:], a window that
        # starts where earlier text was complete, so each token costs O(window), not O(reply).
        self._prefix = self._read = 0

    def _reply_text(self, text: str) -> str:
        return self.template.reply_text(text) if self.template is not None else text

    def _new_text(self) -> str:
        """Text of the ids not yet in self.text ("\ufffd"-terminated while a character is incomplete)."""
        decode = self.tokenizer.decode
        done = decode(self.ids[self._prefix : self._read], skip_special_tokens=False)
        return decode(self.ids[self._prefix :], skip_special_tokens=False)[len(done) :]

    def push(self, token_id: int) -> str:
        """Add one generated token; returns the newly certain text (maybe empty)."""
        self.ids.append(token_id)
        new = self._new_text()
        if not new or (new.endswith("\ufffd") and len(self.ids) - self._read <= _UTF8_MAX_TAIL):
            return ""  # an incomplete UTF-8 sequence: wait for its next bytes
        return self._take(new)

    def _take(self, new: str) -> str:
        """Add complete text: cut the reply at a stop string, else show what is certain."""
        start = max(0, len(self.text) - max((len(s) for s in self.stop_strings), default=0))
        text = self.text + new
        self._prefix, self._read = self._read, len(self.ids)
        cut = min((i for s in self.stop_strings if (i := text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped = text[:cut].rstrip(), True
            return ""
        self.text = text
        visible = self._reply_text(text[: len(text) - _stop_holdback(text, self.stop_strings)])
        return self._show(visible.rstrip())

    def finish(self) -> str:
        """The rest of the reply once generation has ended (eos, max tokens, cancelled). Bytes still
        held back then are a character that generation ended inside: they never become text (a
        streamed reply would otherwise end in U+FFFD); what came with them still counts."""
        head = "" if self.stopped else self._take(self._new_text().rstrip("\ufffd"))
        return head + self._show(self._reply_text(self.text))

    def _show(self, visible: str) -> str:
        if len(visible) <= self.shown:
            return ""
        piece, self.shown = visible[self.shown :], len(visible)
        return piece

    @property
    def reply(self) -> str:
        return self._reply_text(self.text)


def _next_token(logits: torch.Tensor, p: GenerationParams, generator: torch.Generator | None) -> int:
    """logits (V,) -> token id, greedy or by temperature/top-k/top-p sampling, always in float32."""
    logits = logits.float()
    top = float(logits.max())  # NaN propagates through max
    if not -float("inf") < top < float("inf"):
        raise GenerationError(
            f"the model produced non-finite logits (max {top}); with fp16 weights load in bf16 or fp32"
        )
    if not p.sample or p.temperature <= 0:
        return int(logits.argmax())
    logits = logits / p.temperature
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


def sampling_generator(seed: int | None) -> torch.Generator | None:
    """A request's own random stream when it has a seed (the same seed, the same reply, whatever else
    runs); None: torch's global one."""
    return torch.Generator(device="cpu").manual_seed(seed) if seed is not None else None


def load_model(
    path: str | Path,
    device: torch.device,
    dtype: str | None = None,
    max_memory: dict[int | str, str] | None = None,
    quantize: str | None = None,
):
    """A causal LM from a Hugging Face folder: on one device, spread by an accelerate `max_memory`
    device map (OpenChatKit's --gpu-vram/--cpu-ram), and/or quantized by bitsandbytes ("8bit"/"4bit")."""
    from transformers import AutoModelForCausalLM

    if dtype is None:
        dtype = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    kwargs: dict = {"dtype": DTYPES[dtype]}
    if quantize is not None:
        from transformers import BitsAndBytesConfig

        compute = DTYPES["bf16"] if dtype == "fp32" else DTYPES[dtype]
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantize == "8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
        )
    if max_memory is not None:
        kwargs.update(device_map="auto", max_memory=max_memory)
    elif quantize is not None:
        kwargs["device_map"] = {"": str(device)}
    with no_progress_bars():  # a chat user has no use for the "Loading weights" bar
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    return model if "device_map" in kwargs else model.to(device)


def _cache_argument(forward_params: Mapping[str, inspect.Parameter]) -> str:
    """The name a model's forward takes its KV cache by: `cache` in the transformers installed here
    (5.24, where `past_key_values` still works but prints a FutureWarning before the first reply),
    `past_key_values` in releases before the rename. A wrapper whose forward takes **kwargs (PEFT)
    passes it on: then the installed transformers' output class decides."""
    for name in ("cache", "past_key_values"):
        if name in forward_params:
            return name
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _cache_of(out) -> object:
    """The KV cache a forward returned, read by the name it has in the installed transformers (reading
    `past_key_values` where it is called `cache` logs a deprecation warning)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class ModelFolderError(ValueError):
    """A model path that is not a Hugging Face folder a chat can load. The message is one line that
    starts with the path and says what it is instead and what to do (the bot prints it as it is)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
"""A folder holding none of these has no tokenizer: transformers would build an empty one, and the
first reply would die in a traceback far from the cause."""


def check_model_folder(path: str | Path) -> None:
    """Refuse, before anything loads, a path that is not a loadable Hugging Face folder, naming what it
    is: missing (transformers would take it for a hub id, and this project never downloads), a file,
    a training checkpoint or run folder (which tools/convert_to_hf.py turns into one), a folder
    without config.json or without tokenizer files."""
    folder = Path(path)
    if not folder.exists():
        raise ModelFolderError(f"{path}: no such folder")
    if not folder.is_dir():
        raise ModelFolderError(f"{path}: a file, not a model folder (name the folder holding config.json)")
    if _is_checkpoint(folder):
        raise ModelFolderError(
            f"{path}: a training checkpoint, not a Hugging Face folder; convert it first: "
            f"python tools/convert_to_hf.py --checkpoint {path} --out {_export_for(folder)}"
        )
    if not (folder / "config.json").is_file():
        raise ModelFolderError(
            _run_folder_advice(folder, path) or f"{path}: no config.json (not a model folder)"
        )
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{path}: no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy in the tokenizer "
            "the model was trained with"
        )


def _is_checkpoint(folder: Path) -> bool:
    """A DeepSpeed checkpoints folder (a `latest` tag, stepN folders) or one tag folder in it."""
    if (folder / "latest").is_file() or any(folder.glob("*model_states.pt")):
        return True
    return any(any(step.glob("*model_states.pt")) for step in folder.glob("step*") if step.is_dir())


def _export_for(checkpoint: Path) -> str:
    """Where the export of a run's checkpoint goes by convention: outputs/x/checkpoints[/stepN] ->
    outputs/x/hf (OUT when the folder is not named so)."""
    root = checkpoint if checkpoint.name == "checkpoints" else checkpoint.parent
    return str(root.parent / "hf") if root.name == "checkpoints" else "OUT"


def _run_folder_advice(folder: Path, path: str | Path) -> str | None:
    """For a training run's folder (outputs/x, holding checkpoints/ and maybe hf/): what to load."""
    export = folder / "hf"
    if (export / "config.json").is_file():
        return f"{path}: a training run's folder; its export is {export}"
    if (folder / "checkpoints").is_dir():
        return (
            f"{path}: a training run's folder without an export; make one: python tools/convert_to_hf.py "
            f"--checkpoint {folder / 'checkpoints'} --out {export}"
        )
    return None


def describe_load_error(path: str | Path, e: Exception) -> str:
    """The one line a command prints when `path` does not load (ModelFolderError names the path)."""
    return f"error: {e}" if isinstance(e, ModelFolderError) else f"error: cannot load {path}: {e}"


def _input_device(model) -> torch.device:
    """Where input ids go: the embedding's device (models spread by a device map start there)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    return next(model.parameters()).device


def _info(info: StreamInfo | None) -> StreamInfo:
    return info if info is not None else StreamInfo()


@dataclass(eq=False)
class Decoding:
    """One reply, ready to decode: what `ChatEngine.stream` and `complete` return.

    Iterating it decodes alone (the shell bot, `ChatEngine.reply`); nothing runs before the first
    piece is asked for. The server hands it instead to a `chatkit.batching.BatchDecoder`, which reads
    the same fields and decodes it together with other requests."""

    engine: ChatEngine
    ids: list[int]
    """The prompt's token ids."""
    reply: ReplyAssembler
    params: GenerationParams
    seed: int | None
    info: StreamInfo
    cancel: threading.Event | None
    _pieces: Iterator[str] | None = field(default=None, init=False, repr=False)

    def __iter__(self) -> Decoding:
        return self

    def __next__(self) -> str:
        if self._pieces is None:
            e = self.engine
            self._pieces = e._decode(self.ids, self.reply, self.params, self.seed, self.info, self.cancel)
        return next(self._pieces)


class ChatEngine:
    def __init__(
        self,
        model,
        tokenizer,
        template: ChatTemplate,
        device: torch.device | None = None,
        token_sync: Callable[[int], int] | None = None,
    ):
        """`token_sync` makes every process that decodes together take the same token: training samples
        replies on all ranks at once (ZeRO-3 forwards are collective), and ranks must stop together."""
        self.model = model.eval()
        self.token_sync = token_sync
        self.tokenizer = tokenizer
        self.template = template
        self.device = device or _input_device(model)
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.eos_ids = {tokenizer.eos_token_id}
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids |= set(
            gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
        )
        # Prefill computes the logits of the last position only, as generate() does.
        forward = getattr(model, "forward", None)
        params = inspect.signature(forward).parameters if forward is not None else {}
        self._last_logits_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self._cache_arg = _cache_argument(params)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        template: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        max_memory: dict[int | str, str] | None = None,
        quantize: str | None = None,
    ) -> ChatEngine:
        """Load a Hugging Face folder; the template defaults to the one recorded at export."""
        from transformers import AutoTokenizer

        dev = pick_device(device)
        check_model_folder(path)
        name = template or read_meta(path).get("template")
        if name is None:
            raise ModelFolderError(f"{path}: no chatkit.json naming its chat template; pass --template")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = load_model(path, dev, dtype, max_memory, quantize)
        device_mapped = max_memory is not None or quantize is not None
        reasoning = read_meta(path).get("reasoning") if template is None else None
        template_obj = get_template(name, tokenizer, reasoning=reasoning)
        return cls(model, tokenizer, template_obj, None if device_mapped else dev)

    def prompt_ids(
        self,
        messages: Sequence[Message],
        max_new_tokens: int,
        *,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> list[int]:
        """Encode the prompt, dropping the oldest whole turns (never the system prompt) to fit.

        `tools` (OpenAI function schemas) and `thinking` go to the template as `encode_prompt` says;
        the same two keywords mean the same on every method below."""
        return self._fit(messages, max_new_tokens, tools, thinking)[1]

    def prompt_messages(
        self,
        messages: Sequence[Message],
        max_new_tokens: int,
        *,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> list[Message]:
        """The messages `prompt_ids` keeps: the oldest whole turns dropped (never the system prompt)
        until the prompt plus `max_new_tokens` fits the context; a ValueError when nothing fits.

        `len(messages) - len(result)` is how many messages a reply would not see (the shell says so),
        and `raw_prompt(result)` is the text the model is given."""
        return self._fit(messages, max_new_tokens, tools, thinking)[0]

    def _fit(
        self, messages: Sequence[Message], max_new_tokens: int, tools: Tools | None, thinking: bool | None
    ) -> tuple[list[Message], list[int]]:
        """(kept messages, their prompt ids): drop the first user turn and the replies after it, keeping
        the system prompt and the last user turn, until the prompt plus `max_new_tokens` fits."""
        msgs = list(messages)
        while True:
            ids = encode_prompt(self.tokenizer, self.template, msgs, tools, thinking)
            if len(ids) + max_new_tokens <= self.context_length:
                return msgs, ids
            first = 1 if msgs and msgs[0].role == "system" else 0
            nxt = next((i for i in range(first + 1, len(msgs)) if msgs[i].role == "user"), None)
            if nxt is None:
                raise ValueError(
                    f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) does not fit "
                    f"the model's context of {self.context_length} tokens"
                )
            msgs = msgs[:first] + msgs[nxt:]

    def prompt_length(
        self, messages: Sequence[Message], *, tools: Tools | None = None, thinking: bool | None = None
    ) -> int:
        """Tokens in the whole prompt of `messages`, no turn left out: what `stream` feeds when it fits.

        A caller that must refuse a conversation too long for the context (the server answers
        `context_length_exceeded`; it must not trim silently as `prompt_ids` does) measures it here,
        with the engine's own template and tokenization, so the measure and the prompt cannot differ."""
        return len(encode_prompt(self.tokenizer, self.template, messages, tools, thinking))

    def text_length(self, text: str) -> int:
        """Tokens in raw text as `complete` encodes it (no special tokens), for the same checks."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def raw_prompt(
        self, messages: Sequence[Message], *, tools: Tools | None = None, thinking: bool | None = None
    ) -> str:
        """The text of the prompt `stream` feeds for `messages` (pass `prompt_messages`' result: the
        turns that fit). The generation prompt (e.g. `<bot>:`) ends it only when a user turn awaits
        a reply: rendering a history that ends with a reply adds no text the model is never given."""
        eos, bos = special_tokens(self.tokenizer)
        awaiting = bool(messages) and messages[-1].role in ("user", "tool")
        return self.template.render(
            messages, eos, bos, add_generation_prompt=awaiting, tools=tools, thinking=thinking
        )

    def stream(
        self,
        messages: Sequence[Message],
        params: GenerationParams | None = None,
        seed: int | None = None,
        *,
        stop: Sequence[str] = (),
        info: StreamInfo | None = None,
        cancel: threading.Event | None = None,
        tools: Tools | None = None,
        thinking: bool | None = None,
    ) -> Decoding:
        """Yield pieces of the reply as they become certain; their concatenation is the reply.

        `stop` adds stop strings to the template's; `info` receives token counts and the finish
        reason; setting `cancel` ends generation after the current token. The reply holds the
        template's markup for reasoning and tool calls as generated: `template.parse_reply` (or a
        `chatkit.templates.replies.ReplyStream`, piece by piece) reads them out."""
        p = params or GenerationParams()
        ids = self.prompt_ids(messages, p.max_new_tokens, tools=tools, thinking=thinking)
        asm = ReplyAssembler(self.tokenizer, self.template, stop)
        return Decoding(self, ids, asm, p, seed, _info(info), cancel)

    def complete(
        self,
        prompt: str,
        params: GenerationParams | None = None,
        seed: int | None = None,
        *,
        stop: Sequence[str] = (),
        info: StreamInfo | None = None,
        cancel: threading.Event | None = None,
    ) -> Decoding:
        """Stream a continuation of raw text (no chat template; only `stop` and eos end it)."""
        p = params or GenerationParams()
        ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids or len(ids) + p.max_new_tokens > self.context_length:
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus max_new_tokens ({p.max_new_tokens}) does not fit "
                f"the model's context of {self.context_length} tokens"
            )
        return Decoding(self, ids, ReplyAssembler(self.tokenizer, None, stop), p, seed, _info(info), cancel)

    # no_grad, not inference_mode: training samples replies with the model it trains (ZeRO-3 keeps small
    # parameters gathered after a forward, and ones gathered in inference mode would be inference
    # tensors that the next training step cannot save for backward).
    @torch.no_grad()
    def _decode(
        self,
        ids: list[int],
        reply: ReplyAssembler,
        p: GenerationParams,
        seed: int | None,
        info: StreamInfo | None,
        cancel: threading.Event | None,
    ) -> Iterator[str]:
        info = info if info is not None else StreamInfo()
        info.prompt_tokens, info.completion_tokens, info.finish_reason = len(ids), 0, "length"
        gen = sampling_generator(seed)
        input_ids = torch.tensor([ids], device=self.device)
        past, extra = None, self._last_logits_only
        for _ in range(p.max_new_tokens):
            if cancel is not None and cancel.is_set():
                info.finish_reason = "cancelled"
                break
            out = self.model(input_ids=input_ids, use_cache=True, **{self._cache_arg: past}, **extra)
            past = _cache_of(out)
            tok = _next_token(out.logits[0, -1].cpu(), p, gen)
            if self.token_sync is not None:
                tok = self.token_sync(tok)
            piece, ended = self.accept(tok, reply, info)
            if piece:
                yield piece
            if ended:
                break
            input_ids = torch.tensor([[tok]], device=self.device)
        piece = reply.finish()
        if piece:
            yield piece

    def accept(self, tok: int, reply: ReplyAssembler, info: StreamInfo) -> tuple[str, bool]:
        """One generated token into `reply`: (the text it makes certain, whether the reply has ended).
        Decoding alone (`_decode`) and batched (`chatkit.batching`) take every token through here, so
        a reply ends, counts and reads the same both ways."""
        info.completion_tokens += 1
        if tok in self.eos_ids:
            info.finish_reason = "stop"
            return "", True
        piece = reply.push(tok)
        if reply.stopped:
            info.finish_reason = "stop"
        return piece, reply.stopped

    def reply(self, messages: Sequence[Message], params: GenerationParams | None = None, seed=None) -> str:
        return "".join(self.stream(messages, params, seed))


ContextProvider = Callable[[list[Message]], "list[str] | None"]
"""Retrieval's hook: the conversation so far (ending with the user's turn) -> passages, or None."""


def with_context(messages: Sequence[Message], passages: Sequence[str] | None) -> list[Message]:
    """The messages with retrieved passages added to the system prompt, for one turn's prompt.

    The passages go after the system prompt (or into a new one) under a fixed heading, one per
    paragraph; the history itself is not changed, so the next turn retrieves afresh."""
    msgs = list(messages)
    if not passages:
        return msgs
    block = "Relevant passages:\n" + "\n\n".join(p.strip() for p in passages)
    if msgs and msgs[0].role == "system":
        return [Message("system", msgs[0].content + "\n\n" + block), *msgs[1:]]
    return [Message("system", block), *msgs]
