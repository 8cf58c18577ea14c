"""The dry run's load, activation and checkpoint figures (chatkit.plan), against values worked out by
hand for known recipes: GPT-NeoX-20B in an 8-stage pipeline, koala (LLaMA-13B) under ZeRO-3, and a
small GPT-NeoX whose pipeline split can be done on paper."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from chatkit import launch
from chatkit.config import TrainConfig, load_config
from chatkit.models import get_model_spec
from chatkit.plan import (
    World,
    activation_memory,
    checkpoint_size,
    load_ram,
    partition_balanced,
    pipeline_layer_params,
)

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
NEOX20B = 20_554_567_680
LLAMA13B = 13_015_864_320
GPUS = World(ranks=8, nodes=1, per_node=8, gpu=True)


def _plan(capsys, monkeypatch, recipe: str, *args: str) -> list[str]:
    monkeypatch.chdir(REPO)
    launch.main([f"config/{recipe}.yaml", "--dry-run", *args])
    return capsys.readouterr().out.splitlines()


def _line(lines: list[str], start: str) -> str:
    return next(line for line in lines if line.startswith(start))


def test_partition_is_deepspeeds():
    from deepspeed.runtime.utils import partition_balanced as theirs

    rng = random.Random(0)
    cases = [[rng.randint(0, 100) for _ in range(rng.randint(1, 30))] for _ in range(40)]
    config = {"model_type": "gpt_neox", **get_model_spec("GPT-NeoX-20B").config}
    cases += [pipeline_layer_params(config), [5, 5, 5, 5], [0, 0, 7, 0]]
    for weights in cases:
        for parts in (1, 2, 3, 4, 8):
            assert partition_balanced(weights, parts) == [int(x) for x in theirs(weights, parts)], (
                weights,
                parts,
            )


def test_a_small_pipeline_split_by_hand():
    # embedding 1000 x 64; a layer 4 * 64^2 + 2 * 64 * 256 = 49,152; norm 64; head 1000 x 64
    config = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 256,
              "num_attention_heads": 4, "vocab_size": 1000}  # fmt: skip
    layers = pipeline_layer_params(config)
    assert layers == [64_000, 49_152, 49_152, 49_152, 49_152, 64, 64_000]
    # [embedding, 2 layers | 2 layers, norm, head]: 162,304 against 162,368, the closest split
    assert partition_balanced(layers, 2) == [0, 3, 7]
    cfg = TrainConfig(pipeline_stages=2, precision="bf16", deepspeed="pipeline")
    ram, why = load_ram(cfg, config, sum(layers), World(2, 1, 2, False), 1)
    assert ram == {"each": (162_368 + 64_000) * 2} and "pipeline stage share" in why


def test_gpt_neox_20b_pipeline_figures(capsys, monkeypatch):
    from deepspeed.runtime.utils import partition_balanced as theirs

    lines = _plan(capsys, monkeypatch, "GPT-NeoXT-Chat-Base-20B", "--num-gpus", "8")
    # host RAM: the largest of DeepSpeed's 8 stages in fp16 + the embedding being read, where the whole
    # model in fp32 on each rank was 4 x 20.55B = 76.6 GiB (613 GiB for the node)
    h, embed, layer = 6144, 50_432 * 6144, 4 * 6144**2 + 2 * 6144 * 24_576
    weights = [embed, *[layer] * 44, h, embed]
    bounds = [int(x) for x in theirs(weights, 8)]
    share = max(sum(weights[a:b]) for a, b in zip(bounds, bounds[1:], strict=False))
    assert share == 6 * layer  # 2.72B: six decoder layers
    each = (share + embed) * 2 / GIB
    assert f"host RAM at load: {each:.2f} GiB on each rank; pipeline stage share" in _line(lines, "host RAM")
    assert f"{8 * each:.2f} GiB for the node's 8 ranks" in _line(lines, "host RAM")
    assert each < 0.08 * NEOX20B * 4 / GIB
    # activations, fp16, sdpa-style attention (no scores), no recomputation: s=2048, b=1, h=6144, i=4h
    per_layer = 2048 * 6144 * 34  # the paper's 34sbh
    logits = 4 * 2048 * 50_432
    act = _line(lines, "activations per micro-batch")
    assert act.startswith(
        f"activations per micro-batch (1 x 2048): {(44 * per_layer + logits) / GIB:.2f} GiB"
    )
    first = bounds[1] - 1  # the embedding is layer 0
    assert (
        f"the first stage ({first} layers) keeps 8 in flight (1F1B): {first * per_layer * 8 / GIB:.2f} GiB"
        in act
    )
    # checkpoint: fp16 weights (2 B) + fp32 master, m and v (12 B), one copy at ZeRO-0; 3 kept
    disk = _line(lines, "checkpoint on disk")
    assert disk.startswith(
        f"checkpoint on disk: {14 * NEOX20B / GIB:.2f} GiB a save = weights {2 * NEOX20B / GIB:.2f} GiB"
    )
    assert f"keep_checkpoints=3 keeps at most {3 * 14 * NEOX20B / GIB:.2f} GiB" in disk


def test_koala_zero3_figures(capsys, monkeypatch):
    lines = _plan(capsys, monkeypatch, "koala", "--num-gpus", "8")
    ram = _line(lines, "host RAM")
    # transformers reads the whole 16-bit checkpoint on rank 0; the partitions go to the GPUs
    assert ram.startswith(f"host RAM at load: rank 0 {2 * LLAMA13B / GIB:.2f} GiB, each other rank 0.0 MiB")
    # bf16 with gradient checkpointing, s=2048, b=4, h=5120, i=13824, 40 layers: each keeps its 2sbh
    # input, one is rebuilt (18sbh + 4 x 2sbi for SwiGLU)
    s, b, h, i = 2048, 4, 5120, 13_824
    layers = 40 * 2 * s * b * h + (18 * s * b * h + 8 * s * b * i)
    logits = 4 * s * b * 32_000
    assert f"{(layers + logits) / GIB:.2f} GiB = 40 layers {layers / GIB:.2f} GiB" in _line(
        lines, "activations"
    )
    # ZeRO-3 saves the weights as the optimizer's fp32 partitions: 12 B a parameter over 8 files
    assert f"checkpoint on disk: {12 * LLAMA13B / GIB:.2f} GiB a save = weights 0.0 MiB" in _line(
        lines, "checkpoint"
    )
    # on 2 CPU ranks each keeps its half in host RAM
    lines = _plan(capsys, monkeypatch, "koala", "--cpu-ranks", "2")
    half = LLAMA13B * 2 / 2 / GIB
    assert f"rank 0 {2 * LLAMA13B / GIB + half:.2f} GiB, each other rank {half:.2f} GiB" in _line(
        lines, "host RAM"
    )


def test_full_replica_and_lora_checkpoints():
    cfg = load_config(f"{REPO}/config/tiny.yaml", ["deepspeed=zero2", "precision=bf16"], check_files=False)
    ram, why = load_ram(cfg, None, 1_000_000, GPUS, 8)
    assert ram == {"each": 2_000_000} and why.startswith("full replica")
    disk, _ = checkpoint_size(cfg, 1_000_000, 1_000_000)
    assert disk == {"weights": 2_000_000, "optimizer": 12_000_000}
    cfg.precision = "fp32"  # ZeRO-2 keeps its own fp32 partition even so: 4 + (4 + 8)
    assert checkpoint_size(cfg, 1_000_000, 1_000_000)[0] == {"weights": 4_000_000, "optimizer": 12_000_000}
    cfg.deepspeed = "zero0"  # a plain AdamW: m and v beside the fp32 weights
    assert checkpoint_size(cfg, 1_000_000, 1_000_000)[0] == {"weights": 4_000_000, "optimizer": 8_000_000}
    # LoRA on a frozen bf16 base under ZeRO-2: the base in the module file, adapters there and in PEFT's file
    cfg = load_config(
        f"{REPO}/config/tiny.yaml", ["deepspeed=zero2", "precision=bf16", "lora_r=8"], check_files=False
    )
    disk, _ = checkpoint_size(cfg, 1_000_000, 10_000)
    assert disk == {"weights": 2_000_000 + 2 * 20_000, "optimizer": 12 * 10_000}


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_activation_formula_is_the_papers_for_a_gpt_layer(attention):
    config = {"model_type": "gpt_neox", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 256,
              "num_attention_heads": 4, "vocab_size": 100}  # fmt: skip
    cfg = TrainConfig(max_length=32, micro_batch_size=3, precision="bf16", attention=attention)
    act = activation_memory(cfg, config)
    s, b, h, a = 32, 3, 64, 4
    scores = 5 * a * s * s * b if attention == "eager" else 0
    assert act.per_layer == s * b * h * 34 + scores  # sbh(34 + 5as/h), Korthikanti et al. eq. 1
    assert act.total() == 2 * act.per_layer + 4 * s * b * 100
