"""Chat engine vs plain `model.generate`: time to first token and decode tokens/s, same model and prompt.

    python bench/chat_latency.py [--quick]

Both decode greedily with a KV cache for exactly the same number of tokens (eos ignored on both sides).
The final line is JSON with the figures and the ratio engine/generate (target: within 10%).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Message
from chatkit.pretrained import prepare_tiny
from chatkit.tokenization import encode_prompt


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hidden, layers, repeats = (128, 4, 3) if args.quick else (512, 8, 5)
    with tempfile.TemporaryDirectory() as d:
        prepare_tiny([], d, vocab_size=1024, layers=layers, hidden=hidden, heads=8)
        engine = ChatEngine.from_pretrained(d, device="cpu")
    engine.eos_ids = set()  # a random model: decode the full length on both sides
    engine.template = dataclasses.replace(engine.template, stop_strings=())
    history = [Message("user", "Reverse the words: " + " ".join(["apple river stone"] * 8))]
    n = args.new_tokens
    params = GenerationParams(max_new_tokens=n, sample=False)
    ids = torch.tensor([encode_prompt(engine.tokenizer, engine.template, history)])
    model = engine.model

    def generate(k: int):
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False,
                pad_token_id=engine.tokenizer.pad_token_id,
            )  # fmt: skip

    def engine_tokens(k: int):
        return sum(1 for _ in engine.stream(history, GenerationParams(max_new_tokens=k, sample=False)))

    generate(4), engine_tokens(4)  # warm-up
    gen_ttft = timed(lambda: generate(1), repeats)
    eng_ttft = timed(lambda: engine.reply(history, GenerationParams(max_new_tokens=1, sample=False)), repeats)
    gen_total = timed(lambda: generate(n), repeats)
    eng_total = timed(lambda: engine.reply(history, params), repeats)
    gen_tps = (n - 1) / max(gen_total - gen_ttft, 1e-9)
    eng_tps = (n - 1) / max(eng_total - eng_ttft, 1e-9)
    result = {
        "bench": "chat_latency",
        "model": f"gpt_neox {layers}x{hidden}",
        "prompt_tokens": ids.shape[1],
        "new_tokens": n,
        "generate_ttft_ms": round(gen_ttft * 1e3, 2),
        "engine_ttft_ms": round(eng_ttft * 1e3, 2),
        "generate_decode_tokens_per_s": round(gen_tps, 1),
        "engine_decode_tokens_per_s": round(eng_tps, 1),
        "engine_over_generate_decode": round(eng_tps / gen_tps, 3),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
