"""Weights in and out: every checkpoint format chatkit reads or writes, apart from training.

    safe         the one loader of pickled files (`weights_only`, DeepSpeed's classes allow-listed)
    weights      TensorRef streaming, safetensors shards, checksums: every tool below is built on it
    deepspeed    ZeRO 0-3 checkpoints (partitions merged as `zero_to_fp32` does) as lazy refs
    pipeline     pipeline-stage checkpoints (per-layer files) as Hugging Face names
    hf           a training checkpoint -> a Hugging Face folder (tools/convert_to_hf*.py)
    lora         LoRA/QLoRA adapters merged into their base, as PEFT merges them
    meta_llama   Meta's consolidated LLaMA checkpoints -> Hugging Face
    weight_diff  Koala-style weight diffs, made and recovered bit-exactly

Nothing here imports chatkit.train: converting needs no training code (a test checks it).
"""
