"""Pipeline parallelism (DeepSpeed PipelineModule) against the plain trainer.

The pipelined layers must compute the HF model's logits on packed rows, and a 2-stage run on 2 CPU
ranks must take the same steps as the plain trainer on 1 rank over the same micro-batches: equal
losses step for step and equal final weights (the pipeline's per-layer files read back through
pipeline_state_to_hf, the reference's through export.load_deepspeed_weights).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatkit.conversation import write_conversations
from chatkit.datasets.synthetic import make_splits
from chatkit.pretrained import prepare_tiny

REPO = Path(__file__).resolve().parents[1]


def _tiny_llama(neox_dir: Path, out: Path) -> None:
    """A seeded 3-layer, 64-wide Llama with grouped-query attention, tied embeddings and
    LLaMA-2-7B-32K's legacy linear RoPE scaling, reusing the tiny GPT-NeoX tokenizer without its pad
    token (as real Llama tokenizers have none)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatkit.models import save_base

    tok = AutoTokenizer.from_pretrained(neox_dir)
    tok.pad_token = None
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
        rope_scaling={"type": "linear", "factor": 8.0},
    )  # fmt: skip
    torch.manual_seed(0)
    save_base(LlamaForCausalLM(config), tok, out, "openchatkit")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    train, val = make_splits(64, 9, seed=3)  # varied lengths: per-micro-batch averaging would show
    write_conversations(root / "train.jsonl", train)
    write_conversations(root / "val.jsonl", val)  # 9: an odd count, so shards need a filler
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "neox"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    _tiny_llama(root / "neox", root / "llama")
    return root


def _launch(
    root: Path, name: str, ranks: int, overrides: list[str], env: dict | None = None
) -> subprocess.Popen:
    out = root / name
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"train_files=[{root / 'train.jsonl'}]",
        f"output_dir={out}", f"cache_dir={root / 'cache'}", "max_steps=3", "log_every=1", "warmup_steps=0",
        "learning_rate=1e-3", "max_length=128", "micro_batch_size=2",
        "--cpu-ranks", str(ranks), "--master-port", "0", *overrides,
    ]  # fmt: skip
    log = (root / f"{name}.log").open("w")
    env = {**os.environ, **(env or {})}
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)


def _wait(root: Path, name: str, proc: subprocess.Popen) -> Path:
    rc = proc.wait(timeout=300)
    assert rc == 0, (root / f"{name}.log").read_text()[-4000:]
    return root / name


def _losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["loss"] for m in rows if "loss" in m]


def _val_losses(out: Path) -> list[float]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["val_loss"] for m in rows if "val_loss" in m]


def _samples(out: Path) -> list[dict[str, str]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [m["samples"] for m in rows if "samples" in m]


def _compare_with_plain_trainer(root: Path, model: str, common: list[str], pipe_ds: str) -> None:
    from safetensors.torch import load_file

    from chatkit.convert.deepspeed import load_deepspeed_weights
    from chatkit.convert.pipeline import pipeline_state_to_hf

    common = [f"model={root / model}", *common]
    # Side by side: most of each run is start-up, which overlaps well even on 2 cores.
    procs = {
        f"{model}-pipe": _launch(
            root, f"{model}-pipe", 2, [*common, "pipeline_stages=2", f"deepspeed={pipe_ds}"]
        ),
        f"{model}-ref": _launch(root, f"{model}-ref", 1, common),
    }
    pipe, ref = (_wait(root, name, p) for name, p in procs.items())
    assert "2 pipeline stages x 1 data-parallel" in (root / f"{model}-pipe.log").read_text()
    tag = pipe / "checkpoints" / "step3"
    assert (pipe / "checkpoints" / "latest").read_text().strip() == "step3"
    assert {"chatkit.json", "train_config.yaml", "config.json", "tokenizer.json"} <= {
        p.name for p in tag.iterdir()
    }

    lp, lr = _losses(pipe), _losses(ref)
    assert len(lp) == 3
    vp, vr = (_val_losses(out) for out in (pipe, ref))
    assert len(vp) == len(vr) and all(abs(a - b) < 1e-4 for a, b in zip(vp, vr, strict=True)), (vp, vr)
    assert max(abs(a - b) for a, b in zip(lp, lr, strict=True)) < 1e-4, (lp, lr)
    wp, wr = pipeline_state_to_hf(tag), load_deepspeed_weights(ref / "checkpoints")
    assert set(wp) == set(wr)
    diff = {n: float((wp[n] - wr[n].detach()).abs().max()) for n in wp}
    assert max(diff.values()) < 1e-4, diff
    base = load_file(str(root / model / "model.safetensors"))
    assert any(not torch.equal(base[n], wp[n]) for n in wp if n in base)  # training moved the weights

    # the stages export to one Hugging Face model with exactly those weights
    from transformers import AutoModelForCausalLM

    from chatkit.convert.hf import export_hf

    exported = AutoModelForCausalLM.from_pretrained(export_hf(pipe / "checkpoints", root / f"{model}-hf"))
    state = exported.state_dict()
    assert all(torch.equal(state[n], wp[n]) for n in wp)

    # the reference run's ZeRO-3 checkpoint converts to the logits of DeepSpeed's own zero_to_fp32 merge
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    zero3 = AutoModelForCausalLM.from_pretrained(
        export_hf(ref / "checkpoints", root / f"{model}-ref-hf", max_shard_size="100KB")
    )
    theirs = AutoModelForCausalLM.from_pretrained(root / model)
    theirs.load_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(ref / "checkpoints")))
    ids = torch.tensor([[3, 17, 42, 8, 99, 5, 61, 7]])
    with torch.no_grad():
        assert torch.allclose(zero3.eval()(ids).logits, theirs.eval()(ids).logits, atol=1e-5)


@pytest.mark.parametrize("model", ["neox", "llama"])
def test_pipeline_layers_compute_the_hf_logits_on_packed_rows(root, model):
    from transformers import AutoModelForCausalLM

    from chatkit.data import block_causal_mask, collate_rows
    from chatkit.tokenization import Encoded
    from chatkit.train.pipeline_model import layer_specs

    hf = AutoModelForCausalLM.from_pretrained(root / model).eval()
    if model == "llama":  # the legacy rope_scaling key survived saving and loading
        assert (hf.config.rope_parameters["rope_type"], hf.config.rope_parameters["factor"]) == (
            "linear",
            8.0,
        )
    rows = [
        [Encoded([5, 6, 7, 8], [5, 6, 7, 8]), Encoded([9, 10, 11], [9, 10, 11])],
        [Encoded([12, 13], [12, 13])],
    ]
    batch = collate_rows(rows, pad_id=1)
    x = (batch["input_ids"], batch["position_ids"], batch["segment_ids"])
    with torch.no_grad():
        for spec in layer_specs(hf):
            module = spec.build()
            x = spec.forward_fn(module, x) if getattr(spec, "forward_fn", None) else module(x)
        mask = block_causal_mask(batch["segment_ids"], torch.float32)
        ref = hf(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
    assert torch.allclose(x, ref, atol=1e-5)


@pytest.mark.parametrize("model", ["neox", "llama"])
def test_hf_key_map_covers_every_weight(root, model):
    from transformers import AutoModelForCausalLM

    from chatkit.convert.pipeline import hf_key
    from chatkit.train.pipeline_model import layer_specs

    hf = AutoModelForCausalLM.from_pretrained(root / model)
    names = set()
    for idx, spec in enumerate(layer_specs(hf)):
        if getattr(spec, "forward_fn", None) is None:  # a tied copy saves no file of its own
            names |= {hf_key(hf.config, idx, k) for k in spec.build().state_dict()} - {None}
    expected = set(hf.state_dict()) - ({"lm_head.weight"} if hf.config.tie_word_embeddings else set())
    assert names == expected


@pytest.mark.slow
@pytest.mark.distributed
def test_gpt_neox_packed_with_accumulation_matches_plain_trainer(root):
    common = [
        "pack=true",
        "gradient_accumulation_steps=2",
        f"val_files=[{root / 'val.jsonl'}]",
        "eval_every=2",
        'eval_prompts=["What is 2 + 3?", "Reverse the words: red fish blue"]',
    ]
    _compare_with_plain_trainer(root, "neox", common, "pipeline")
    assert len(_val_losses(root / "neox-pipe")) == 2  # at step 2 and at the end
    # sample replies: greedy through the stages = greedy through the plain model's KV-cache engine
    samples = {name: _samples(root / f"neox-{name}") for name in ("pipe", "ref")}
    assert len(samples["pipe"]) == 2 and all(len(s) == 2 for s in samples["pipe"])
    assert samples["pipe"] == samples["ref"]
    assert any(reply for s in samples["pipe"] for reply in s.values())

    # killed with SIGKILL after step 3 (checkpoint at 2), resumed: the weights of the uninterrupted run
    from chatkit.convert.pipeline import pipeline_state_to_hf

    args = [f"model={root / 'neox'}", *common, "pipeline_stages=2", "deepspeed=pipeline", "save_every=2"]
    killed = _launch(root, "neox-killed", 2, args, env={"CHATKIT_FAULT": "step:3"})
    assert killed.wait(timeout=300) != 0
    assert (root / "neox-killed" / "checkpoints" / "latest").read_text() == "step2"
    run = _wait(root, "neox-killed", _launch(root, "neox-killed", 2, [*args, "resume=auto"]))
    assert "at step 2" in (root / "neox-killed.log").read_text()
    a = pipeline_state_to_hf(root / "neox-pipe" / "checkpoints" / "step3")
    b = pipeline_state_to_hf(run / "checkpoints" / "step3")
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)


def test_gradient_checkpointing_turns_on_pipeline_activation_checkpointing():
    from chatkit.config import TrainConfig
    from chatkit.train.pipeline import checkpoint_interval

    preset = {"pipeline": {"activation_checkpoint_interval": 0}}
    assert checkpoint_interval(TrainConfig(gradient_checkpointing=False), preset) == 0
    assert checkpoint_interval(TrainConfig(gradient_checkpointing=True), preset) == 1
    assert (
        checkpoint_interval(
            TrainConfig(gradient_checkpointing=True), {"pipeline": {"activation_checkpoint_interval": 2}}
        )
        == 2
    )
    assert checkpoint_interval(TrainConfig(gradient_checkpointing=False), {}) == 0


@pytest.mark.slow
@pytest.mark.distributed
def test_gradient_checkpointing_in_a_pipeline_run_keeps_the_losses(root):
    """gradient_checkpointing=true reaches the pipeline engine (it logs the interval) and recomputing
    activations changes no loss: the same run as the packed GPT-NeoX pipeline run above."""
    common = [
        f"model={root / 'neox'}", "pack=true", "gradient_accumulation_steps=2", f"val_files=[{root / 'val.jsonl'}]",
        "eval_every=2", "pipeline_stages=2", "deepspeed=pipeline",
    ]  # fmt: skip
    plain = root / "neox-pipe"
    if not (plain / "metrics.jsonl").is_file():  # this test run alone
        plain = _wait(root, "neox-pipe-plain", _launch(root, "neox-pipe-plain", 2, common))
    ckpt = _wait(
        root, "neox-pipe-gc", _launch(root, "neox-pipe-gc", 2, [*common, "gradient_checkpointing=true"])
    )
    assert "activation checkpointing: every 1 pipeline layer(s)" in (root / "neox-pipe-gc.log").read_text()
    assert "activation checkpointing" not in (root / f"{plain.name}.log").read_text()
    lc, lp = _losses(ckpt), _losses(plain)
    assert len(lc) == 3 and max(abs(a - b) for a, b in zip(lc, lp, strict=True)) < 1e-5, (lc, lp)
    assert max(abs(a - b) for a, b in zip(_val_losses(ckpt), _val_losses(plain), strict=True)) < 1e-5


@pytest.mark.slow
@pytest.mark.distributed
def test_llama_gqa_tied_unpacked_checkpointed_matches_plain_trainer(root):
    ds = json.loads((REPO / "dsconfig" / "pipeline.json").read_text())
    ds["pipeline"]["activation_checkpoint_interval"] = 1
    (root / "pipeline_ckpt.json").write_text(json.dumps(ds))
    _compare_with_plain_trainer(root, "llama", ["pack=false"], str(root / "pipeline_ckpt.json"))


@pytest.mark.slow
@pytest.mark.distributed
def test_two_stages_times_two_replicas_match_plain_data_parallel(root):
    """4 ranks = 2 pipeline stages x 2 data-parallel replicas against the plain trainer on 2 data-parallel
    ranks: the same rows per step on the same replicas, so the same losses, validation and weights."""
    from chatkit.convert.deepspeed import load_deepspeed_weights
    from chatkit.convert.pipeline import pipeline_state_to_hf

    common = [
        f"model={root / 'neox'}", "pack=true", f"val_files=[{root / 'val.jsonl'}]", "eval_every=2",
        # a small lr keeps the model near its random start, whose greedy replies vary token to token
        "learning_rate=1e-5", 'eval_prompts=["What is 2 + 3?", "Reverse the words: red fish blue"]',
    ]  # fmt: skip
    pipe = _wait(
        root, "dp-pipe", _launch(root, "dp-pipe", 4, [*common, "pipeline_stages=2", "deepspeed=pipeline"])
    )
    ref = _wait(root, "dp-ref", _launch(root, "dp-ref", 2, [*common, "deepspeed=zero2"]))
    assert "2 pipeline stages x 2 data-parallel" in (root / "dp-pipe.log").read_text()
    lp, lr = _losses(pipe), _losses(ref)
    assert len(lp) == 3 and max(abs(a - b) for a, b in zip(lp, lr, strict=True)) < 1e-4, (lp, lr)
    vp, vr = _val_losses(pipe), _val_losses(ref)
    assert len(vp) == 2 and max(abs(a - b) for a, b in zip(vp, vr, strict=True)) < 1e-4, (vp, vr)
    wp, wr = pipeline_state_to_hf(pipe / "checkpoints" / "step3"), load_deepspeed_weights(ref / "checkpoints")
    assert max(float((wp[n] - wr[n]).abs().max()) for n in wp) < 1e-4
    # greedy replies generated through the stages (one eval_batch per token) = the plain model's
    sp, sr = _samples(pipe), _samples(ref)
    assert len(sp) == 2 and sp == sr
    assert all(len(set(reply)) > 5 for s in sp for reply in s.values()), sp  # not one repeated token
