"""Serve a model: a web chat at / and an OpenAI-compatible API (Koala's served chat, on chatkit's engine).

python inference/serve.py --model outputs/demo/hf [--host 127.0.0.1] [--port 8000] [--api-key KEY]
curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
     -d '{"model": "demo", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'
"""

from chatkit.serve import main

if __name__ == "__main__":
    main()
