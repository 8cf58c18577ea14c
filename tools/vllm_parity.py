"""Serve an exported model with vLLM and check it says what the bot says: same prompt, same greedy reply.

    python tools/vllm_parity.py --model outputs/demo/hf [--data outputs/demo/heldout.jsonl] [-n 20]

For each conversation (the history before its last reply; built-in prompts without --data):
- the prompt vLLM's chat path builds from the folder's embedded `chat_template` (text and token ids,
  `LLM.chat`) must equal the one chatkit's template builds (`encode_prompt`, what bot.py sends);
- vLLM's greedy reply (temperature 0, the template's stop strings, the same max tokens) must equal the
  bot's engine's greedy reply (`ChatEngine.reply` with sampling off).

It needs a CUDA GPU and the `vllm` package; elsewhere it prints why it skipped and exits 0 (with
--require, 1). The last line is JSON: prompts, prompts_identical, replies_identical, the first difference.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

PROMPTS = [
    "What is 23 + 19?",
    "Reverse the words: apple river stone",
    "Hi, my name is Zoe.",
    "Write one sentence about the sea.",
]


def skip_reason() -> str | None:
    """Why vLLM cannot run here, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device: vLLM serves on GPUs"
    if importlib.util.find_spec("vllm") is None:
        return "the vllm package is not installed (pip install vllm, on a GPU machine)"
    return None


def conversations(data: str | None, n: int) -> list[list]:
    """Histories ending with a user message: each held-out conversation without its last reply."""
    from chatkit.conversation import Message, iter_jsonl

    if data is None:
        return [[Message("user", p)] for p in PROMPTS][:n]
    out = []
    for conv in iter_jsonl(data):
        msgs = list(conv.messages)
        while msgs and msgs[-1].role == "assistant":
            msgs.pop()
        if msgs:
            out.append(msgs)
        if len(out) == n:
            break
    return out


def compare(model: str, histories: list[list], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    from chatkit.chat import ChatEngine, GenerationParams
    from chatkit.tokenization import encode_prompt

    engine = ChatEngine.from_pretrained(model, device="cuda")
    ours_text = [
        engine.reply(h, GenerationParams(max_new_tokens=max_tokens, sample=False)) for h in histories
    ]
    ours_ids = [encode_prompt(engine.tokenizer, engine.template, h) for h in histories]
    del engine
    llm = LLM(model=model, dtype="float32", enforce_eager=True, seed=0, gpu_memory_utilization=0.3)
    params = SamplingParams(
        temperature=0.0, max_tokens=max_tokens, stop=list(get_stop_strings(model)), skip_special_tokens=True
    )
    messages = [[m.to_dict() for m in h] for h in histories]
    outputs = llm.chat(messages, params, use_tqdm=False)
    result = {
        "prompts": len(histories),
        "prompts_identical": 0,
        "replies_identical": 0,
        "first_difference": None,
    }
    for h, ids, text, out in zip(histories, ours_ids, ours_text, outputs, strict=True):
        theirs = out.outputs[0].text.strip()
        same_prompt = list(out.prompt_token_ids) == ids
        same_reply = theirs == text.strip()
        result["prompts_identical"] += same_prompt
        result["replies_identical"] += same_reply
        if (not same_prompt or not same_reply) and result["first_difference"] is None:
            result["first_difference"] = {
                "history": [m.to_dict() for m in h], "bot": text, "vllm": theirs, "prompt_ids_equal": same_prompt,
            }  # fmt: skip
    return result


def get_stop_strings(model: str) -> tuple[str, ...]:
    """The template's stop strings (besides eos), as the bot stops on them."""
    from transformers import AutoTokenizer

    from chatkit.io import read_meta
    from chatkit.templates import get_template

    meta = read_meta(model)
    return tuple(get_template(meta["template"], AutoTokenizer.from_pretrained(model)).stop_strings)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="an exported Hugging Face folder (tools/convert_to_hf.py)")
    p.add_argument("--data", help="conversation JSONL (default: a few built-in prompts)")
    p.add_argument("-n", type=int, default=20, help="conversations to compare")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--require", action="store_true", help="exit 1 instead of skipping without a GPU or vLLM")
    args = p.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"error: {args.model}: not a Hugging Face model folder (no config.json)")
    if args.data and not Path(args.data).is_file():
        sys.exit(f"error: {args.data}: no such file")
    reason = skip_reason()
    if reason:
        print(f"skipped: {reason}")
        print(json.dumps({"skipped": reason}))
        sys.exit(1 if args.require else 0)
    from chatkit.quiet import quiet_dependencies

    quiet_dependencies()
    result = compare(args.model, conversations(args.data, args.n), args.max_tokens)
    ok = result["prompts_identical"] == result["replies_identical"] == result["prompts"]
    print(f"{'identical' if ok else 'DIFFERENT'}: prompts {result['prompts_identical']}/{result['prompts']}, "
          f"greedy replies {result['replies_identical']}/{result['prompts']}")  # fmt: skip
    print(json.dumps(result))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
