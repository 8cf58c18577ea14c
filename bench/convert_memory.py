"""Weight conversion memory and speed: our streamed tools beside the usual whole-model way.

    python bench/convert_memory.py           # a random GPT-NeoX checkpoint of about 1 GB (fp32)
    python bench/convert_memory.py --quick   # about 250 MB

Two conversions, each run by us and by the common alternative, each in a fresh Python process whose
peak resident memory (VmHWM, reset after imports through /proc/self/clear_refs) is read at the end:

- reshard: a Hugging Face folder in 4 shards -> shards of 1/10 the model. Ours: tools/make_shards.py's
  path (chatkit.convert.weights). Theirs: transformers `from_pretrained` + `save_pretrained(max_shard_size=...)`.
- pipeline: a pipeline-parallel checkpoint (one `layer_XX-model_states.pt` per layer, as DeepSpeed writes)
  -> a Hugging Face folder. Ours: chatkit.convert.hf.export_hf. Theirs: `torch.load` every layer file into
  one state dict, rename, `safetensors.torch.save_file` (the shape of OpenChatKit's converter).

Reported per run: seconds, GB/s (input bytes / wall time), peak RSS, its growth over the process's
memory after imports (transformers' GPT-NeoX modelling code, ~130 MB, is imported first by every run:
a fixed cost, not one that grows with the model), and both divided by the largest input file.
Final line: JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from chatkit.convert.weights import TensorRef, write_weights

PROBE = """
import json, sys, time
from pathlib import Path
import torch
import transformers.models.gpt_neox.modeling_gpt_neox  # a fixed ~130 MB of code, loaded before the baseline
{imports}
def rss(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
Path("/proc/self/clear_refs").write_text("5")
base = rss("VmRSS:")
t0 = time.perf_counter()
{body}
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak": rss("VmHWM:"), "base": base}}))
"""

OURS_RESHARD = (
    "from chatkit.convert.weights import hf_refs, write_weights",
    "write_weights(sys.argv[2], hf_refs(sys.argv[1]), int(sys.argv[3]))",
)
THEIRS_RESHARD = (
    "from transformers import AutoModelForCausalLM",
    "AutoModelForCausalLM.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2], max_shard_size=int(sys.argv[3]))",
)
OURS_PIPELINE = (
    "from chatkit.convert.hf import export_hf",
    "export_hf(sys.argv[1], sys.argv[2], max_shard_size=int(sys.argv[3]))",
)
THEIRS_PIPELINE = (
    "from chatkit.convert.pipeline import hf_key\nfrom transformers import AutoConfig\nfrom safetensors.torch import save_file",
    """config = AutoConfig.from_pretrained(sys.argv[1])
state = {}
for f in sorted(Path(sys.argv[1]).glob("layer_*-model_states.pt")):
    idx = int(f.name[6:8])
    for k, v in torch.load(f, weights_only=True).items():
        if (name := hf_key(config, idx, k)) is not None:
            state[name.replace("lm_head", "embed_out")] = v
Path(sys.argv[2]).mkdir()
save_file(state, Path(sys.argv[2]) / "model.safetensors")""",
)


def config_for(target_bytes: int, vocab: int):
    """A GPT-NeoX config of about `target_bytes` in fp32 (hidden 1024, layers to size)."""
    from transformers import GPTNeoXConfig

    hidden = 1024
    per_layer = 12 * hidden * hidden + 13 * hidden
    layers = max(2, round((target_bytes / 4 - 2 * vocab * hidden) / per_layer))
    return GPTNeoXConfig(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=16,
        intermediate_size=4 * hidden, tie_word_embeddings=False,
    )  # fmt: skip


def random_refs(config) -> list[TensorRef]:
    """The model's tensors as refs that draw seeded random data when loaded (never all at once)."""
    from transformers import AutoModelForCausalLM

    from chatkit.convert.hf import disk_names

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = disk_names(model)
    refs = []
    for i, (k, v) in enumerate(model.state_dict().items()):

        def load(i=i, shape=tuple(v.shape)) -> torch.Tensor:
            return torch.randn(shape, generator=torch.Generator().manual_seed(i)) * 0.02

        refs.append(TensorRef(names[k], tuple(v.shape), torch.float32, load))
    return refs


def make_inputs(root: Path, target_bytes: int) -> tuple[Path, Path, int]:
    """An HF folder in 4 shards and the same weights as a pipeline checkpoint; returns their paths."""
    from chatkit.models import train_tokenizer
    from chatkit.train.pipeline_model import layer_specs

    tok = train_tokenizer((f"sample text number {i} for the tokenizer" for i in range(2000)), vocab_size=512)
    config = config_for(target_bytes, len(tok))
    refs = random_refs(config)
    total = sum(r.nbytes() for r in refs)
    hf = root / "hf"
    write_weights(hf, refs, total // 4 + 1)
    config.save_pretrained(hf)
    tok.save_pretrained(hf)
    (hf / "chatkit.json").write_text(json.dumps({"template": "openchatkit"}))
    # the pipeline layout: the real layer wrappers' state dicts, one file per layer, from the HF folder
    from transformers import AutoModelForCausalLM

    tag = root / "pipe" / "step1"
    tag.mkdir(parents=True)
    model = AutoModelForCausalLM.from_pretrained(hf)
    for idx, spec in enumerate(layer_specs(model)):
        torch.save(spec.build().state_dict(), tag / f"layer_{idx:02d}-model_states.pt")
    del model
    torch.save({"module": None}, tag / "mp_rank_00_model_states.pt")
    for f in hf.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, tag / f.name)
    (root / "pipe" / "latest").write_text("step1")
    return hf, tag, total


def probe(code: tuple[str, str], src: Path, out: Path, shard: int) -> dict:
    script = PROBE.format(imports=code[0], body=code[1])
    r = subprocess.run(
        [sys.executable, "-c", script, str(src), str(out), str(shard)], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def row(name: str, m: dict, in_bytes: int, largest: int) -> dict:
    res = {
        "seconds": round(m["seconds"], 2),
        "gb_per_s": round(in_bytes / 1e9 / m["seconds"], 3),
        "peak_rss_mb": round(m["peak"] / 2**20),
        "peak_growth_mb": round((m["peak"] - m["base"]) / 2**20),
        "peak_rss_over_largest_shard": round(m["peak"] / largest, 3),
        "peak_growth_over_largest_shard": round((m["peak"] - m["base"]) / largest, 3),
    }
    print(f"{name:18s} " + "  ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="about 250 MB instead of 1 GB")
    p.add_argument("--size-mb", type=int, help="model size in MB (fp32)")
    args = p.parse_args()
    target = (args.size_mb or (250 if args.quick else 1000)) * 10**6
    root = Path(tempfile.mkdtemp(prefix="convert-bench-"))
    try:
        hf, tag, total = make_inputs(root, target)
        largest_hf = max(f.stat().st_size for f in hf.glob("*.safetensors"))
        largest_layer = max(f.stat().st_size for f in tag.glob("layer_*.pt"))
        out_shard = total // 10
        print(f"model: {total / 1e9:.2f} GB fp32; HF shards up to {largest_hf / 1e6:.0f} MB, "
              f"layer files up to {largest_layer / 1e6:.0f} MB; output shards {out_shard / 1e6:.0f} MB")  # fmt: skip
        results = {}
        for name, code, src, largest in (
            ("reshard_ours", OURS_RESHARD, hf, largest_hf),
            ("reshard_transformers", THEIRS_RESHARD, hf, largest_hf),
            ("pipeline_ours", OURS_PIPELINE, tag, largest_layer),
            ("pipeline_load_all", THEIRS_PIPELINE, tag, largest_layer),
        ):
            results[name] = row(name, probe(code, src, root / f"out-{name}", out_shard), total, largest)
        summary = {
            "model_gb": round(total / 1e9, 3),
            "largest_hf_shard_mb": round(largest_hf / 1e6),
            "reshard_peak_rss_over_largest_shard": results["reshard_ours"]["peak_rss_over_largest_shard"],
            "reshard_gb_per_s": results["reshard_ours"]["gb_per_s"],
            "reshard_memory_ratio_vs_transformers": round(
                results["reshard_transformers"]["peak_growth_mb"]
                / max(1, results["reshard_ours"]["peak_growth_mb"]),
                2,
            ),
            "pipeline_memory_ratio_vs_load_all": round(
                results["pipeline_load_all"]["peak_growth_mb"]
                / max(1, results["pipeline_ours"]["peak_growth_mb"]),
                2,
            ),
            "runs": results,
        }
        print(json.dumps(summary))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
