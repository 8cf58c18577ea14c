"""Chat engine vs plain `model.generate`: time to first token and decode tokens/s, same model and prompt;
then the server's throughput (chatkit.serve on uvicorn, 127.0.0.1) with 1, 4, 8 and 16 concurrent
clients, decoded in one batch (target: 8 clients >= 3x the tokens/s of one), every answer checked
against the same request served alone.

    python bench/chat_latency.py [--quick]

Both decode greedily with a KV cache for exactly the same number of tokens (eos ignored on both sides).
The final line is JSON with the figures, the ratio engine/generate (target: within 10%),
`server_8_over_1_clients` and `batched_answers_identical`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from chatkit.chat import ChatEngine, GenerationParams, StreamInfo
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


CLIENTS = (1, 4, 8, 16)
"""The server's concurrency sweep: clients asking at once."""


def client_prompts(count: int) -> list[list[Message]]:
    """One conversation per client, each its own (different words, 4 to 19 of them), so that every
    client's answer differs and a mixed-up answer would show; lengths differ, so batched rows pad."""
    words = "apple river stone cloud paper music tiger lamp".split()
    out = []
    for i in range(count):
        picked = [words[(i * 3 + j * (i % 5 + 1)) % len(words)] for j in range(4 + i)]
        out.append([Message("user", "Reverse the words: " + " ".join(picked))])
    return out


def server_throughput(engine: ChatEngine, n: int, clients: tuple[int, ...] = CLIENTS) -> dict:
    """Completion tokens/s of the real server (chatkit.serve on uvicorn, 127.0.0.1) with each number
    of concurrent greedy chat clients, n tokens each; each client's answer is checked against the
    same request served alone (one at a time, which also gives the 1-client rate)."""
    import socket
    import threading
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import uvicorn

    from chatkit.serve import ServerConfig, create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig("bench", GenerationParams(max_new_tokens=n, sample=False), max_batch=max(clients))
    app = create_app(engine, config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    convs = client_prompts(max(clients))
    # One client, its connections kept alive, shared by the threads: a new httpx client per request
    # builds an SSL context (~70 ms of CPU in this process, beside the server's) and a connection.
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=max(clients)))

    def ask(i: int) -> tuple[str, int]:
        body = {"messages": [m.to_dict() for m in convs[i]], "max_tokens": n, "temperature": 0}
        r = http.post(url, json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]["completion_tokens"]

    ask(0)  # warm-up
    t0 = time.perf_counter()
    alone = [ask(i) for i in range(len(convs))]  # one at a time: each request served alone
    rates = {1: sum(k for _, k in alone) / (time.perf_counter() - t0)}
    identical, wall = True, {}
    for c in (c for c in clients if c > 1):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(c) as pool:
            answers = list(pool.map(ask, range(c)))
        wall[c] = time.perf_counter() - t0
        rates[c] = sum(k for _, k in answers) / wall[c]
        identical &= [a for a, _ in answers] == [a for a, _ in alone[:c]]
    http.close()
    server.should_exit = True
    thread.join(timeout=10)
    return {
        "server_clients": 8,
        "server_tokens_per_s": round(rates[8], 1),
        "server_wall_s": round(wall[8], 2),
        "server_tokens_per_s_by_clients": {str(c): round(r, 1) for c, r in rates.items()},
        "server_8_over_1_clients": round(rates[8] / rates[1], 2),
        "batched_answers_identical": identical,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hidden, layers, repeats = (128, 4, 5) if args.quick else (512, 8, 7)
    with tempfile.TemporaryDirectory() as d:
        prepare_tiny([], d, vocab_size=1024, layers=layers, hidden=hidden, heads=8)
        engine = ChatEngine.from_pretrained(d, device="cpu")
    engine.eos_ids = set()  # a random model: decode the full length on both sides
    engine.template = dataclasses.replace(engine.template, stop_strings=())
    history = [Message("user", "Reverse the words: " + " ".join(["apple river stone"] * 8))]
    n = args.new_tokens
    ids = torch.tensor([encode_prompt(engine.tokenizer, engine.template, history)])
    model = engine.model

    def generate(k: int):
        with torch.inference_mode():
            return model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=k, min_new_tokens=k, do_sample=False,
                pad_token_id=engine.tokenizer.pad_token_id,
            )  # fmt: skip

    def engine_tokens(k: int) -> int:
        info = StreamInfo()
        for _ in engine.stream(history, GenerationParams(max_new_tokens=k, sample=False), info=info):
            pass
        return info.completion_tokens

    # Both sides must really decode n tokens, or the rates below mean nothing.
    assert engine_tokens(n) == n and generate(n).shape[1] - ids.shape[1] == n
    gen_ttft = timed(lambda: generate(1), repeats)
    eng_ttft = timed(lambda: engine_tokens(1), repeats)
    gen_total = timed(lambda: generate(n), repeats)
    eng_total = timed(lambda: engine_tokens(n), repeats)
    if min(gen_total - gen_ttft, eng_total - eng_ttft) <= 0:
        raise SystemExit(
            "timing noise exceeds the decode time; rerun on a quiet machine or raise --new-tokens"
        )
    gen_tps = (n - 1) / (gen_total - gen_ttft)
    eng_tps = (n - 1) / (eng_total - eng_ttft)
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
        "engine_over_generate_ttft": round(eng_ttft / gen_ttft, 3),
    }
    result.update(server_throughput(engine, n))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
