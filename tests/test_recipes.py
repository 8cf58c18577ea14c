"""The original recipes: every launcher's --dry-run plan, every YAML valid, the tiny variants train.

pytest tests/test_recipes.py             # everything; -m "not slow" skips the two CPU trainings
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from chatkit import launch
from chatkit.architectures import get_architecture
from chatkit.config import load_config
from chatkit.models import get_model_spec, spec_for_path
from chatkit.plan import memory_per_gpu, nominal_params

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = sorted(p.name for p in (REPO / "training").glob("finetune_*.sh"))
RECIPES = sorted(p.name for p in (REPO / "config").glob("*.yaml"))
ORIGINALS = [
    "Pythia-Chat-Base-7B", "GPT-NeoXT-Chat-Base-20B", "llama-2-7b-32k-mqa", "llama-2-7b-32k-booksum",
    "openalpaca", "koala", "llama2-koalpaca-qlora", "tiny",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("CHATKIT_CPU_RANKS", "MASTER_PORT")}
    env["PYTHON"] = sys.executable
    return env


def sh(script: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", f"training/{script}", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
    )


def _section(stdout: str, name: str) -> list[str]:
    lines = stdout.splitlines()
    start = lines.index(f"# {name}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("# ")), len(lines))
    return lines[start:end]


def _dry_run(capsys, monkeypatch, recipe: str, *argv: str) -> tuple[dict, str, str]:
    """chatkit.launch in-process: (resolved config, plan text, command line)."""
    monkeypatch.delenv("CHATKIT_CPU_RANKS", raising=False)
    monkeypatch.chdir(REPO)
    launch.main([f"config/{recipe}.yaml", *argv, "--dry-run"])
    out = capsys.readouterr().out
    cfg = yaml.safe_load("\n".join(_section(out, "resolved config")))
    return cfg, "\n".join(_section(out, "plan")), _section(out, "command")[0]


def test_every_original_recipe_has_a_launcher_and_a_yaml():
    for name in ORIGINALS:
        assert f"finetune_{name}.sh" in LAUNCHERS
        assert f"{name}.yaml" in RECIPES


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_and_names_a_registered_model(recipe: str):
    cfg = load_config(f"{REPO}/config/{recipe}", check_files=False)
    assert spec_for_path(cfg.model) is not None, cfg.model


@pytest.mark.parametrize("script", LAUNCHERS)
@pytest.mark.slow
def test_launcher_dry_run_prints_config_plan_and_command(script: str):
    # On 8 GPUs, the hardware of the recipes: fp16 and 8 pipeline stages need it. Weights and data
    # that are not here are warned of, not refused: a dry run plans without them.
    proc = sh(script, "--dry-run", "--num-gpus", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "error:" not in proc.stderr
    for line in proc.stderr.splitlines():
        if line.startswith("warning: "):
            assert line.startswith(
                (
                    "warning: model: no such folder",
                    "warning: train_files: no such file",
                    "warning: val_files: no such file",
                )
            )
    plan = "\n".join(_section(proc.stdout, "plan"))
    for key in ("model:", "world:", "parallelism:", "global batch:", "tokens per step:", "precision:"):
        assert key in plan
    assert "memory per GPU:" in plan and "activations not included" in plan
    cmd = _section(proc.stdout, "command")[0]
    recipe = script.removeprefix("finetune_").removesuffix(".sh")
    assert "-m deepspeed.launcher.runner" in cmd and cmd.endswith(f"--config config/{recipe}.yaml")


@pytest.mark.parametrize("script", [s for s in LAUNCHERS if s != "finetune_demo.sh"])
@pytest.mark.slow
def test_launcher_tiny_dry_run(script: str):
    proc = sh(script, "--tiny", "--dry-run", "--num-gpus", "0")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load("\n".join(_section(proc.stdout, "resolved config")))
    assert cfg["model"] in ("pretrained/tiny/model", "pretrained/tiny-llama/model")
    assert cfg["max_steps"] == 4 and cfg["max_length"] <= 256 and cfg["precision"] == "fp32"
    assert cfg["pipeline_stages"] <= 2 and "offload" not in cfg["deepspeed"]


def test_pythia_plan_on_eight_gpus(capsys, monkeypatch):
    cfg, plan, cmd = _dry_run(capsys, monkeypatch, "Pythia-Chat-Base-7B", "--num-gpus", "8")
    assert "Pythia-6.9B-deduped (EleutherAI/pythia-6.9b-deduped, gpt_neox), 6.86B parameters" in plan
    assert "world: 8 rank(s) = 8 GPU(s) x 1 node(s)" in plan
    assert "parallelism: 4 pipeline stage(s) x 2 data-parallel" in plan  # OpenChatKit's 4 x 2
    assert "global batch: 1 micro x 2 DP x 32 accumulation = 64 rows of 2048" in plan
    assert "tokens per step: 64 x 2048 = 131,072" in plan
    assert "steps: 20,000 (max_steps)" in plan
    assert "--num_gpus 8 " in cmd and "DS_ACCELERATOR" not in cmd
    assert cfg["train_files"][1] == "data/OIG/files/unified_p3/train.jsonl:0.5"


def test_plan_counts_hostfile_nodes(capsys, monkeypatch, tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\nnode-a slots=8\nnode-b slots=8\n")
    _, plan, cmd = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "8", "--hostfile", str(hosts))
    assert "world: 16 rank(s) = 8 GPU(s) x 2 node(s)" in plan
    assert "global batch: 4 micro x 16 DP x 4 accumulation = 256 rows" in plan
    assert f"--hostfile {hosts} " in cmd


def test_dry_run_refuses_stages_that_do_not_fit(capsys, monkeypatch):
    """Once only a warning in the plan: 8 stages on 4 GPUs cannot start, dry run or not."""
    with pytest.raises(SystemExit) as e:
        _dry_run(capsys, monkeypatch, "GPT-NeoXT-Chat-Base-20B", "--num-gpus", "4")
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        "error: pipeline_stages: 8 stages need a multiple of 8 ranks and this launch starts 4 GPU rank(s); "
        "set pipeline_stages, or plan for other hardware with --num-gpus N"
    ]
    assert "# command" not in out
    # On CPU ranks, fp16 is refused as well, each on a line of its own.
    with pytest.raises(SystemExit):
        _dry_run(capsys, monkeypatch, "GPT-NeoXT-Chat-Base-20B", "--num-gpus", "0")
    err = capsys.readouterr().err
    errors = [line.split(":")[1] for line in err.splitlines() if line.startswith("error:")]
    assert errors == [" precision", " pipeline_stages"]


def test_qlora_plan(capsys, monkeypatch):
    _, plan, _ = _dry_run(capsys, monkeypatch, "llama2-koalpaca-qlora", "--num-gpus", "1")
    assert "QLoRA (4bit base) r=8 alpha=16 dropout=0.05 on q_proj,v_proj" in plan
    assert "LoRA (2 + 2 + 6 B) x 6.55M" in plan  # 8-bit AdamW: 2 bytes of m and v + 4 of fp32 master


def test_tiny_overrides_keep_the_recipe_and_user_overrides_win(capsys, monkeypatch):
    cfg, _, cmd = _dry_run(
        capsys, monkeypatch, "llama2-koalpaca-qlora", "--tiny", "--num-gpus", "0", "max_steps=2"
    )
    assert cfg["model"] == "pretrained/tiny-llama/model"
    assert (cfg["quantize"], cfg["lora_r"], cfg["lora_alpha"], cfg["optim"]) == ("4bit", 8, 16.0, "adamw8bit")
    assert cfg["template"] == "llama2" and cfg["max_steps"] == 2
    assert cfg["output_dir"] == "outputs/llama2-koalpaca-qlora-tiny"
    assert cmd.endswith("precision=fp32 max_steps=2")
    cfg, _, _ = _dry_run(capsys, monkeypatch, "koala", "--tiny", "--num-gpus", "0", "deepspeed=zero3_offload")
    assert cfg["deepspeed"] == "zero3_offload"  # given after --tiny's choices, so it wins
    cfg, _, _ = _dry_run(capsys, monkeypatch, "GPT-NeoXT-Chat-Base-20B", "--tiny", "--cpu-ranks", "4",
                         "pipeline_stages=2")  # fmt: skip
    assert cfg["pipeline_stages"] == 2  # the user's, after --tiny's 4


def test_tiny_swaps_offload_and_caps_stages():
    base = load_config(f"{REPO}/config/koala.yaml", ["deepspeed=zero3_offload"], check_files=False)
    assert "deepspeed=zero3" in launch.tiny_overrides(base, "config/koala.yaml", 2, gpu=False)
    base = load_config(f"{REPO}/config/GPT-NeoXT-Chat-Base-20B.yaml", check_files=False)
    over = launch.tiny_overrides(base, "x.yaml", 1, gpu=False)
    assert "pipeline_stages=1" in over and "deepspeed=zero0" in over
    over = launch.tiny_overrides(base, "x.yaml", 6, gpu=True)
    assert "pipeline_stages=6" in over and not any(o.startswith("precision=") for o in over)


def test_memory_formula():
    spec = get_model_spec("Pythia-6.9B-deduped")
    cfg = load_config(f"{REPO}/config/tiny.yaml", ["precision=bf16", "deepspeed=zero0"], check_files=False)
    mem, _ = memory_per_gpu(cfg, spec.params, spec.params, dp=8)
    assert sum(mem.values()) == 16 * spec.params  # 2 + 2 + 12 bytes a parameter, nothing sharded
    cfg.deepspeed = "zero2"
    mem, formula = memory_per_gpu(cfg, spec.params, spec.params, dp=8)
    assert sum(mem.values()) == pytest.approx(2 * spec.params + 14 * spec.params / 8)
    assert "ZeRO-2 over 8" in formula
    cfg.deepspeed = "zero3_offload"
    mem, _ = memory_per_gpu(cfg, spec.params, spec.params, dp=8)
    assert (
        mem["weights"] == 0 and mem["optimizer"] == 0 and mem["grads"] == pytest.approx(2 * spec.params / 8)
    )


def test_registry_sizes():
    spec = get_model_spec("Llama-2-13b-chat-hf")
    assert get_architecture("llama").lora_params(spec.config, 8, ["q_proj", "v_proj"]) == 6_553_600
    assert nominal_params(get_model_spec("tiny")) == pytest.approx(1.05e6, rel=0.05)
    assert spec_for_path("EleutherAI/gpt-neox-20b").name == "GPT-NeoX-20B"
    assert spec_for_path("somewhere/else/model") is None


def test_tiny_llama_shares_the_tiny_tokenizer(tmp_path: Path):
    from transformers import AutoConfig, AutoTokenizer

    from chatkit.pretrained import prepare_tiny

    for arch in ("gpt_neox", "llama"):
        prepare_tiny([], str(tmp_path / arch), vocab_size=300, layers=2, hidden=48, heads=4, arch=arch)
    assert AutoConfig.from_pretrained(tmp_path / "llama").model_type == "llama"
    a, b = (AutoTokenizer.from_pretrained(tmp_path / arch) for arch in ("gpt_neox", "llama"))
    assert a.get_vocab() == b.get_vocab()


# --- the tiny variants train on CPU ranks -----------------------------------------------------------


def _train_tiny(script: str, out: Path) -> str:
    proc = sh(script, "--tiny", "--num-gpus", "0", "--master-port", "0", f"output_dir={out}", timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
    assert all(math.isfinite(v) for v in losses)
    return proc.stdout + proc.stderr


def _export_and_chat(run: Path) -> str:
    """The run's export, as a user makes it, loaded with plain `from_pretrained` and chatted with."""
    from transformers import AutoModelForCausalLM

    from chatkit.chat import ChatEngine, GenerationParams
    from chatkit.conversation import Message

    proc = subprocess.run(
        [sys.executable, "tools/convert_to_hf.py", "--checkpoint", str(run / "checkpoints"), "--out", str(run / "hf")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "quantization_config" not in json.loads((run / "hf" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(run / "hf")
    engine = ChatEngine.from_pretrained(run / "hf", device="cpu")
    return engine.reply([Message("user", "What is 2 + 3?")], GenerationParams(max_new_tokens=8, sample=False))


@pytest.mark.slow
@pytest.mark.distributed
def test_pythia_tiny_trains_with_a_two_stage_pipeline(tmp_path: Path):
    log = _train_tiny("finetune_Pythia-Chat-Base-7B.sh", tmp_path / "run")
    assert "2 rank(s) = 2 pipeline stages x 1 data-parallel" in log
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["model"] == "pretrained/tiny/model" and saved["deepspeed"] == "pipeline"
    assert saved["train_files"] == ["data/demo/files/train.jsonl"]
    assert isinstance(_export_and_chat(tmp_path / "run"), str)


@pytest.mark.slow
@pytest.mark.distributed
def test_koalpaca_qlora_tiny_trains(tmp_path: Path):
    log = _train_tiny("finetune_llama2-koalpaca-qlora.sh", tmp_path / "run")
    assert "LoRA r=8 alpha=16.0 on ['q_proj', 'v_proj']" in log
    saved = yaml.safe_load((tmp_path / "run" / "train_config.yaml").read_text())
    assert saved["model"] == "pretrained/tiny-llama/model" and saved["quantize"] == "4bit"
    assert (tmp_path / "run" / "checkpoints" / "step4" / "adapter_model.safetensors").is_file()
    # its export merges the adapters into full-precision weights: a plain folder, no bitsandbytes
    assert isinstance(_export_and_chat(tmp_path / "run"), str)


OTHER_TINY = [
    s
    for s in LAUNCHERS
    # demo-dpo's tiny variant is koala-dpo's (DPO on the demo pairs) on the other tiny architecture
    if s
    not in (
        "finetune_demo.sh",
        "finetune_demo-dpo.sh",
        "finetune_Pythia-Chat-Base-7B.sh",
        "finetune_llama2-koalpaca-qlora.sh",
    )  # fmt: skip
]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("script", OTHER_TINY)
def test_every_tiny_recipe_exports_a_folder_that_loads_and_chats(script: str, tmp_path: Path):
    """With the two tests above: every recipe's tiny variant trains, converts with tools/convert_to_hf.py,
    loads with plain `from_pretrained` and answers through the chat engine."""
    _train_tiny(script, tmp_path / "run")
    assert isinstance(_export_and_chat(tmp_path / "run"), str)
