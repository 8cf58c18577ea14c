"""Each rank loads what it holds, in the training dtype.

- a pipeline stage builds the model on the meta device and reads only its own layers' tensors from
  the safetensors files (chatkit.train.pipeline_model): the tensors equal `from_pretrained`'s, tied
  embeddings are read on both end stages, template tokens resize the embeddings as before;
- LoRA under ZeRO-3 is partitioned while it loads (HfDeepSpeedConfig active for LoRA too) and takes
  the steps of the same LoRA run under ZeRO-2.

    pytest tests/test_stage_load.py              # the in-process checks
    pytest tests/test_stage_load.py -m ""        # with the 2-rank ones
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatkit.launch import free_port

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A 3-layer GPT-NeoX (separate head, stored as `embed_out` as transformers saves it) and a 3-layer
    Llama with tied embeddings and grouped-query attention, seeded, saved as safetensors."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("stage-load")
    configs = {
        "neox": (GPTNeoXForCausalLM, GPTNeoXConfig(
            vocab_size=96, hidden_size=32, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            max_position_embeddings=128,
        )),
        "llama": (LlamaForCausalLM, LlamaConfig(
            vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        )),
    }  # fmt: skip
    for name, (cls, config) in configs.items():
        torch.manual_seed(0)
        cls(config).save_pretrained(root / name)
    return {name: root / name for name in configs}


def test_gpt_neox_stores_its_head_under_its_old_name(models):
    from safetensors import safe_open

    with safe_open(str(models["neox"] / "model.safetensors"), "pt") as f:
        assert "embed_out.weight" in set(f.keys())


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_empty_model_holds_no_weights_and_draws_no_random_numbers(models, arch):
    from transformers import AutoModelForCausalLM

    from chatkit.train.pipeline_model import empty_model

    state = torch.get_rng_state()
    model = empty_model(models[arch], torch.bfloat16, attn_implementation="sdpa")
    assert torch.equal(state, torch.get_rng_state())
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    ref = AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.bfloat16)
    theirs = dict(ref.named_buffers())
    assert dict(model.named_buffers()).keys() == theirs.keys()
    assert all(torch.equal(b, theirs[n]) for n, b in model.named_buffers())  # rotary frequencies


@pytest.mark.parametrize("arch", ["neox", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_every_module_gives_from_pretrained_weights(models, arch, dtype):
    from transformers import AutoModelForCausalLM

    from chatkit.train.pipeline_model import checkpoint_tensors, empty_model, load_parameters

    model = empty_model(models[arch], dtype, attn_implementation="sdpa")
    load_parameters([model], model, checkpoint_tensors(model, models[arch]))
    ref = AutoModelForCausalLM.from_pretrained(models[arch], dtype=dtype).state_dict()
    ours = model.state_dict()
    assert ours.keys() == ref.keys()
    assert all(ours[n].dtype == dtype and torch.equal(ours[n], ref[n]) for n in ref)
    if arch == "llama":  # the tie survives: one tensor, read once
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_a_checkpoint_missing_a_tensor_is_named(models, tmp_path):
    from safetensors.torch import load_file, save_file

    from chatkit.train.pipeline_model import checkpoint_tensors, empty_model, load_parameters

    state = load_file(str(models["llama"] / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((models["llama"] / "config.json").read_text())
    model = empty_model(tmp_path, torch.float32, attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"no tensor for model\.layers\.1\.mlp\.up_proj\.weight"):
        load_parameters([model], model, checkpoint_tensors(model, tmp_path))


# --- 2 ranks: two pipeline stages ------------------------------------------------------------------

STAGE = r"""
import json, sys
from types import SimpleNamespace
import torch, deepspeed
deepspeed.init_distributed(dist_backend="gloo")
from transformers import AutoModelForCausalLM
from chatkit.config import TrainConfig
from chatkit.train.pipeline import load_model, make_topology
from chatkit.train.pipeline_model import build_pipeline

path, grow = sys.argv[1], int(sys.argv[2])
cfg = TrainConfig(model=path, attention="sdpa", precision="fp32", max_length=64)
ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
vocab = ref.config.vocab_size + grow
run = SimpleNamespace(cfg=cfg, device=torch.device("cpu"), added_tokens=grow, tokenizer=range(vocab))
torch.manual_seed(0)
model = load_model(run)
module = build_pipeline(model, make_topology(2, 2), lambda logits, labels: logits.sum(), weights=path)
torch.manual_seed(0)
if grow:
    ref.resize_token_embeddings(vocab)
expected = ref.state_dict()
held = {n: p for n, p in model.named_parameters(remove_duplicate=False) if not p.is_meta}
print(json.dumps({
    "held": sorted(held),
    "equal": all(torch.equal(p, expected[n]) for n, p in held.items()),
    "module": sum(p.numel() for p in module.parameters()),
    "parts": [int(i) for i in module.parts],
}), flush=True)
# Leave the group together and skip interpreter teardown, as training/train.py does: gloo's threads torn
# down in Python's order now and then abort a finished rank ("terminate called without an active
# exception", exit 250).
torch.distributed.barrier()
torch.distributed.destroy_process_group()
import os
os._exit(0)
"""


def _two_stages(model: Path, grow: int = 0) -> list[dict]:
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STAGE, str(model), str(grow)],
            cwd=REPO,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={
                **os.environ,
                "DS_ACCELERATOR": "cpu",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
                "RANK": str(r),
                "LOCAL_RANK": str(r),
                "WORLD_SIZE": "2",
            },
        )  # fmt: skip
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(err[-3000:] for _, err in outs)
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]


@pytest.mark.slow
@pytest.mark.distributed
def test_each_stage_reads_only_its_layers_and_the_tie_reaches_both_ends(models):
    neox, llama = _two_stages(models["neox"]), _two_stages(models["llama"])
    for stages in (neox, llama):
        assert stages[0]["parts"] == stages[1]["parts"] and all(s["equal"] for s in stages)
        first, last = (set(s["held"]) for s in stages)
        assert not any(".layers." in n and n in last for n in first)  # no decoder layer on both
    parts = neox[0]["parts"]  # [0, cut, 6]: the embedding, 3 layers, the norm, the head
    first, last = (set(s["held"]) for s in neox)
    assert {n.split(".")[2] for n in first if ".layers." in n} == {str(i - 1) for i in range(1, parts[1])}
    assert "gpt_neox.embed_in.weight" in first and "lm_head.weight" in last
    assert "lm_head.weight" not in first and "gpt_neox.embed_in.weight" not in last
    first, last = (set(s["held"]) for s in llama)
    assert "model.embed_tokens.weight" in first and "model.embed_tokens.weight" in last  # tied
    assert "model.norm.weight" in last and "model.norm.weight" not in first


@pytest.mark.slow
@pytest.mark.distributed
def test_template_tokens_resize_the_embeddings_as_a_full_load_does(models):
    """The stage that holds the (resized) embedding has the rows the full model's resize draws; the one
    that holds neither end keeps nothing of them."""
    for arch, embed in (("neox", "gpt_neox.embed_in.weight"), ("llama", "model.embed_tokens.weight")):
        stages = _two_stages(models[arch], grow=3)
        assert all(s["equal"] for s in stages), arch
        assert embed in stages[0]["held"]


# --- LoRA under ZeRO-3 -----------------------------------------------------------------------------


def _launch(root: Path, name: str, *args: str) -> Path:
    cmd = [
        sys.executable, "-m", "chatkit.launch", "config/tiny.yaml", f"model={root / 'base'}",
        f"train_files=[{root / 'train.jsonl'}]", f"output_dir={root / name}", f"cache_dir={root / 'cache'}",
        "max_steps=4", "log_every=1", "warmup_steps=0", "learning_rate=1e-2", "max_length=128",
        "micro_batch_size=2", "lora_r=4", "lora_alpha=8", "--cpu-ranks", "2", "--master-port", "0", *args,
    ]  # fmt: skip
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    (root / f"{name}.log").write_text(r.stdout + r.stderr)
    return root / name


@pytest.mark.slow
@pytest.mark.distributed
def test_lora_under_zero3_loads_partitioned_and_takes_the_zero2_steps(tmp_path):
    from chatkit.conversation import write_conversations
    from chatkit.datasets.synthetic import make_splits
    from chatkit.pretrained import prepare_tiny

    train, _ = make_splits(64, 0, seed=2)
    write_conversations(tmp_path / "train.jsonl", train)
    prepare_tiny([str(tmp_path / "train.jsonl")], str(tmp_path / "base"), vocab_size=300, layers=2, hidden=64)
    zero3 = _launch(tmp_path, "zero3", "deepspeed=zero3")
    zero2 = _launch(tmp_path, "zero2", "deepspeed=zero2")
    log = (tmp_path / "zero3.log").read_text()
    # the full count though each rank holds half: the model was partitioned while it loaded
    assert "LoRA r=4 alpha=8.0" in log and " of 0 parameters" not in log
    losses = [
        [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
        for run in (zero3, zero2)
    ]
    assert len(losses[0]) == 4 and max(abs(a - b) for a, b in zip(*losses, strict=True)) < 1e-4, losses
    assert (zero3 / "checkpoints" / "step4" / "adapter_model.safetensors").is_file()
