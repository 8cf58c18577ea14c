"""Streamed conversions against the models they came from: logits equal to 1e-5 in fp32.

Pipeline checkpoints are written here exactly as DeepSpeed's PipelineModule saves them (each layer
wrapper's state dict in `layer_XX-model_states.pt`), from the real wrappers of chatkit.pipeline, so the
test needs no DeepSpeed launch; the launched runs (ZeRO-3, LoRA, 2-stage pipelines) are converted in
test_e2e.py, test_training_runs.py and test_pipeline.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatkit.conversation import write_conversations
from chatkit.convert.hf import export_hf
from chatkit.convert.lora import lora_merged_refs
from chatkit.convert.weights import hf_refs, write_weights
from chatkit.datasets.synthetic import make_splits
from chatkit.pretrained import prepare_tiny

REPO = Path(__file__).resolve().parents[1]
IDS = torch.tensor([[5, 9, 14, 3, 27, 8, 2, 11], [40, 41, 42, 43, 44, 45, 46, 47]])


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    """A GPT-NeoX (untied) and a Llama (GQA, tied embeddings) tiny base sharing one tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("convert")
    train, _ = make_splits(64, 0, seed=5)
    write_conversations(root / "train.jsonl", train)
    prepare_tiny(
        [str(root / "train.jsonl")], str(root / "neox"), vocab_size=300, layers=2, hidden=64, heads=4
    )
    tok = AutoTokenizer.from_pretrained(root / "neox")
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=96, tie_word_embeddings=True, max_position_embeddings=128,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    return {"neox": root / "neox", "llama": root / "llama", "root": root}


def _perturbed(path: Path):
    """The base with every weight moved, standing in for a trained model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _write_pipeline_checkpoint(model, base: Path, tag: Path) -> None:
    from chatkit.train.pipeline_model import layer_specs

    tag.mkdir(parents=True)
    for idx, spec in enumerate(layer_specs(model)):
        if getattr(spec, "forward_fn", None) is None:  # the tied head reuses layer 0 and saves nothing
            torch.save(spec.build().state_dict(), tag / f"layer_{idx:02d}-model_states.pt")
    torch.save({"module": None}, tag / "mp_rank_00_model_states.pt")  # what the engine writes beside them
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / name, tag / name)
    (tag / "chatkit.json").write_text(json.dumps({"template": "openchatkit", "base_model": str(base)}))
    (tag.parent / "latest").write_text(tag.name)


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_pipeline_checkpoint_converts_to_the_same_logits(bases, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = _perturbed(bases[arch])
    _write_pipeline_checkpoint(trained, bases[arch], tmp_path / "ckpt" / "step5")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_size=60_000)
    assert len(list(out.glob("model-*.safetensors"))) > 2  # several shards with an index
    converted = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.allclose(_logits(converted), _logits(trained), atol=1e-5)
    state = converted.state_dict()
    assert all(torch.equal(state[k], v) for k, v in trained.state_dict().items())


def test_export_casts_to_bf16_and_records_it(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    trained = _perturbed(bases["neox"])
    _write_pipeline_checkpoint(trained, bases["neox"], tmp_path / "ckpt" / "step1")
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    converted = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert converted.dtype == torch.bfloat16
    w = "gpt_neox.layers.0.attention.query_key_value.weight"
    assert torch.equal(converted.state_dict()[w], trained.state_dict()[w].bfloat16())


def test_wrong_architecture_is_refused(bases, tmp_path):
    _write_pipeline_checkpoint(_perturbed(bases["neox"]), bases["neox"], tmp_path / "ckpt" / "step1")
    r = subprocess.run(
        [sys.executable, "tools/convert_to_hf_llama.py", "--checkpoint", str(tmp_path / "ckpt"), "--out",
         str(tmp_path / "hf")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1 and "a gpt_neox checkpoint, not llama" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "hf").exists()


def test_export_never_writes_over_its_checkpoint(bases, tmp_path):
    _write_pipeline_checkpoint(_perturbed(bases["neox"]), bases["neox"], tmp_path / "ckpt" / "step1")
    before = sorted(p.name for p in (tmp_path / "ckpt" / "step1").iterdir())
    for out in (tmp_path / "ckpt" / "step1", tmp_path / "ckpt"):
        with pytest.raises(ValueError, match="overlaps the checkpoint"):
            export_hf(tmp_path / "ckpt", out)
    assert sorted(p.name for p in (tmp_path / "ckpt" / "step1").iterdir()) == before


def test_missing_layer_file_is_named(bases, tmp_path):
    _write_pipeline_checkpoint(_perturbed(bases["llama"]), bases["llama"], tmp_path / "ckpt" / "step1")
    (tmp_path / "ckpt" / "step1" / "layer_02-model_states.pt").unlink()
    with pytest.raises(ValueError, match=r"missing \['model.layers.1"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")


def _adapter(base: Path, out: Path, **lora_kwargs):
    """A PEFT LoRA adapter with random (non-zero) A and B, saved as PEFT saves it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(task_type="CAUSAL_LM", init_lora_weights=False, **lora_kwargs)
    peft = get_peft_model(model, cfg).eval()
    peft.save_pretrained(out)
    return peft


LORA_CASES = {
    "neox": dict(r=4, lora_alpha=8, target_modules=["query_key_value", "dense", "dense_4h_to_h"]),
    "llama": dict(
        r=4,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"down_proj": 4},
    ),  # fmt: skip
}


@pytest.mark.parametrize("arch", ["neox", "llama"])
def test_merged_lora_gives_the_adapter_models_logits(bases, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    peft = _adapter(bases[arch], tmp_path / "adapter", **LORA_CASES[arch])
    write_weights(tmp_path / "merged", lora_merged_refs(hf_refs(bases[arch]), tmp_path / "adapter"))
    shutil.copy(bases[arch] / "config.json", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    base = AutoModelForCausalLM.from_pretrained(bases[arch]).eval()
    assert not torch.allclose(_logits(base), _logits(peft), atol=1e-3)  # the adapter matters
    assert torch.allclose(_logits(merged), _logits(peft), atol=1e-5)


@pytest.mark.slow
def test_merge_lora_script(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    peft = _adapter(bases["neox"], tmp_path / "adapter", **LORA_CASES["neox"])
    before = {p.name: p.read_bytes() for p in bases["neox"].iterdir() if p.is_file()}
    r = subprocess.run(
        [sys.executable, "tools/merge_lora.py", "--base", str(bases["neox"]), "--adapter",
         str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert torch.allclose(_logits(merged), _logits(peft), atol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    assert {p.name: p.read_bytes() for p in bases["neox"].iterdir() if p.is_file()} == before


def test_lora_adapter_for_another_model_is_refused(bases, tmp_path):
    _adapter(bases["neox"], tmp_path / "adapter", **LORA_CASES["neox"])
    with pytest.raises(ValueError, match="no base weight to merge into"):
        lora_merged_refs(hf_refs(bases["llama"]), tmp_path / "adapter")


def _sh(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_make_shards_keeps_the_input_unless_asked(bases, tmp_path):
    from transformers import AutoModelForCausalLM

    src = tmp_path / "src"
    shutil.copytree(bases["neox"], src)
    r = _sh(
        "tools/make_shards.py", "--input", str(src), "--out", str(tmp_path / "a"), "--max-shard-size", "100KB"
    )
    assert r.returncode == 0, r.stderr[-2000:]
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / "a" / f).stat().st_size < 100_000 + 70_000 for f in files)
    assert src.is_dir() and (src / "model.safetensors").is_file()
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").eval()
    assert torch.equal(_logits(a), _logits(AutoModelForCausalLM.from_pretrained(src).eval()))
    r = _sh("tools/make_shards.py", "--input", str(src), "--out", str(src))
    assert r.returncode == 1 and "--delete-input" in r.stderr and (src / "model.safetensors").is_file()
    r = _sh("tools/make_shards.py", "--input", str(src), "--out", str(tmp_path / "b"), "--delete-input")
    assert r.returncode == 0 and not src.exists() and (tmp_path / "b" / "model.safetensors").is_file()


MEMORY_PROBE = """
import sys
from pathlib import Path
from chatkit.convert.weights import hf_refs, peak_rss_bytes, write_weights
import torch
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
before = peak_rss_bytes()
write_weights(sys.argv[2], hf_refs(sys.argv[1]), "1GB", torch.bfloat16)
print(peak_rss_bytes() - before)
"""


def test_streamed_rewrite_stays_under_one_and_a_half_shards(tmp_path):
    """A 192 MB fp32 model in 3 shards, rewritten as bf16: the peak grows by less than 1.5 x one shard."""
    g = torch.Generator().manual_seed(0)
    state = {f"layers.{i}.w": torch.randn(1024, 2048, generator=g) for i in range(24)}  # 8 MB each
    refs = [(k, v) for k, v in state.items()]
    from chatkit.convert.weights import TensorRef

    write_weights(
        tmp_path / "in", [TensorRef(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in refs], "64MB"
    )
    del state, refs
    shard = max(f.stat().st_size for f in (tmp_path / "in").glob("*.safetensors"))
    r = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path / "in"), str(tmp_path / "out")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    grew = int(r.stdout.split()[-1])
    assert grew < 1.5 * shard + 8 * 2**20, (grew, shard)
    # streamed: a few tensors (8 MB fp32 + its bf16 copy), below one shard. Measured 16-20 MB alone and
    # once 33 MB inside the full suite (malloc keeps freed buffers); a shard at once would be >= 58 MB.
    assert grew < 0.75 * shard


def test_a_qlora_export_is_a_plain_full_precision_folder(bases, tmp_path):
    """A QLoRA checkpoint's config.json carries the training-time quantization_config (4-bit NF4);
    the export merges the adapters into full-precision weights, so the config it writes must not say
    4-bit: every loader would rebuild bitsandbytes layers (an AssertionError on CPU, a silent
    re-quantization on a GPU)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    peft = _adapter(
        bases["llama"], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]
    )
    tag = tmp_path / "ckpt" / "step4"
    shutil.copytree(tmp_path / "adapter", tag)
    config = AutoConfig.from_pretrained(bases["llama"])
    config.quantization_config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4").to_dict()
    config.save_pretrained(tag)
    AutoTokenizer.from_pretrained(bases["llama"]).save_pretrained(tag)
    (tag / "mp_rank_00_model_states.pt").write_bytes(b"")  # what DeepSpeed writes beside the adapters
    (tag.parent / "latest").write_text("step4")
    (tag / "chatkit.json").write_text(
        json.dumps({"template": "openchatkit", "base_model": str(bases["llama"])})
    )
    assert "quantization_config" in json.loads((tag / "config.json").read_text())

    out = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear  # not a bitsandbytes layer
    assert torch.allclose(_logits(model), _logits(peft), atol=1e-5)


def test_a_checkpoint_file_holding_code_is_refused_with_one_clear_message(bases, tmp_path):
    import os

    class RunsCode:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'ran'}",)

    _write_pipeline_checkpoint(_perturbed(bases["neox"]), bases["neox"], tmp_path / "ckpt" / "step1")
    layer = tmp_path / "ckpt" / "step1" / "layer_01-model_states.pt"
    state = torch.load(layer, weights_only=True)
    state["extra"] = RunsCode()
    torch.save(state, layer)
    with pytest.raises(
        ValueError, match=r"layer_01-model_states.pt: refused: .*GLOBAL posix.system.*nothing from it was run"
    ):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "hf").exists()
