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


def test_a_global_batch_other_than_the_recipes_is_warned_of(capsys, monkeypatch):
    """koala on 1 GPU once trained on 16 rows a step instead of 128, at the learning rate chosen for 128,
    and the plan said nothing."""
    _, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "1")
    assert "global batch: 4 micro x 1 DP x 4 accumulation = 16 rows of 2048, not the recipe's 128" in plan
    assert (
        "warning: global batch 16 rows, not the 128 this recipe was made for (intended_batch), with the "
        "learning_rate (2e-05) chosen for 128: gradient_accumulation_steps=32 keeps it, or scale learning_rate"
    ) in plan
    _, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "1", "gradient_accumulation_steps=32")
    assert (
        "= 128 rows of 2048, as the recipe's 128 (intended_batch)" in plan and "warning: global" not in plan
    )
    _, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "8")
    assert "as the recipe's 128" in plan and "warning: global" not in plan
    _, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "3", "micro_batch_size=5")
    assert "so that micro x 3 DP x accumulation = 128" in plan
    # Every original recipe states its batch, on the hardware its source names; the tiny variants do not.
    for name in ORIGINALS:
        cfg = load_config(f"{REPO}/config/{name}.yaml", check_files=False)
        assert cfg.intended_batch or name == "tiny", name
    cfg, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--tiny", "--num-gpus", "0")
    assert cfg["intended_batch"] == 0 and "warning: global" not in plan


def test_a_memory_estimate_above_the_gpu_is_warned_of(capsys, monkeypatch):
    """koala on 1 GPU: 194 GiB before activations, once printed without a word."""
    from chatkit.plan import GIB, World, plan_lines

    cfg = load_config(f"{REPO}/config/koala.yaml", check_files=False)
    one_gpu = World(1, 1, 1, True)
    plan = "\n".join(plan_lines(cfg, one_gpu, memory=(80 * GIB, "80.00 GiB, an A100's or H100's")))
    assert "memory per GPU: 193.95 GiB" in plan
    assert "warning: the memory per GPU estimated (193.95 GiB, before activations) exceeds 80.00 GiB" in plan
    assert "offload to CPU memory" in plan and "shard the weights too" not in plan  # koala is ZeRO-3 already
    assert "warning: the memory" not in "\n".join(plan_lines(cfg, one_gpu, memory=(200 * GIB, "200 GiB")))
    # Planned for GPUs this machine lacks: an 80 GiB GPU is assumed, and said to be.
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    _, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "1")
    assert "exceeds 80.00 GiB, an A100's or H100's (no GPU here to ask)" in plan
    _, plan, _ = _dry_run(capsys, monkeypatch, "koala", "--num-gpus", "8")
    assert "warning: the memory" not in plan  # 26 GiB a GPU with ZeRO-3 over 8


def test_cpu_rank_plans_say_per_rank(capsys, monkeypatch):
    _, plan, _ = _dry_run(capsys, monkeypatch, "demo", "--num-gpus", "0")
    assert "memory per rank: " in plan and "per GPU" not in plan
    _, plan, _ = _dry_run(capsys, monkeypatch, "demo-dpo", "--num-gpus", "0", "model=pretrained/tiny/model")
    assert "memory per rank above includes it" in plan and "per GPU" not in plan
    _, plan, _ = _dry_run(capsys, monkeypatch, "demo", "--num-gpus", "2")
    assert "memory per GPU: " in plan and "per rank" not in plan


def test_the_parameter_count_is_the_folders_when_it_is_here(capsys, monkeypatch, tmp_path: Path):
    """It was the registry's estimate even with the weights at hand (963K for the tiny base, said 1.05M)."""
    from transformers import AutoModelForCausalLM

    from chatkit.pretrained import prepare_tiny

    _, plan, _ = _dry_run(capsys, monkeypatch, "Pythia-Chat-Base-7B", "--num-gpus", "8")
    assert "6.86B parameters (the registry's figure: the folder is not here)" in plan
    monkeypatch.chdir(tmp_path)  # a checkout whose tiny base was built with another shape
    prepare_tiny([], "pretrained/tiny/model", vocab_size=300, layers=2, hidden=48, heads=4)
    n = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained("pretrained/tiny/model").parameters())
    launch.main([f"{REPO}/config/tiny.yaml", "--num-gpus", "0", "--dry-run", "train_files=[x.jsonl]"])
    plan = "\n".join(_section(capsys.readouterr().out, "plan"))
    count = f"{n / 1e3:.2f}K"
    assert (
        f"model: tiny (gpt_neox), {count} parameters (counted in pretrained/tiny/model/model.safetensors)"
        in plan
    )
    assert f"trainable: every weight, {count} parameters" in plan and f"x {count}, ZeRO-3" in plan
    # A folder outside the registry: counted the same way, and so given a memory estimate.
    launch.main(
        [f"{REPO}/config/tiny.yaml", "--num-gpus", "0", "--dry-run", "model=pretrained/tiny/model/../model"]
    )
    plan = "\n".join(_section(capsys.readouterr().out, "plan"))
    assert f"not in chatkit.models: {count} parameters, counted in " in plan and "memory per rank: " in plan


@pytest.mark.parametrize("quantize", ["", "4bit"])
def test_gradient_checkpointing_is_enabled_by_its_current_name(tmp_path: Path, quantize: str):
    """transformers 5 deprecates `gradient_checkpointing_enable` (a FutureWarning in every rank of koala's
    and llama2-koalpaca's runs, the latter through PEFT's k-bit preparation)."""
    import warnings
    from dataclasses import replace

    import torch

    from chatkit.pretrained import prepare_tiny
    from chatkit.train.adapters import apply_adapters, load_base

    prepare_tiny([], str(tmp_path / "base"), vocab_size=300, layers=1, hidden=32, heads=2, arch="llama")
    cfg = load_config(f"{REPO}/config/llama2-koalpaca-qlora.yaml", check_files=False)
    cfg = replace(cfg, model=str(tmp_path / "base"), quantize=quantize, gradient_checkpointing=True)
    if not quantize:
        cfg = replace(cfg, optim="adamw", deepspeed="zero3")
    model = load_base(cfg, torch.device("cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = apply_adapters(model, cfg)
    assert [str(w.message) for w in caught if "checkpointing_enable" in str(w.message)] == []
    assert model.base_model.model.is_activation_checkpointing


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


@pytest.mark.slow
@pytest.mark.parametrize(
    ("base", "template"),
    # (Llama 3.1 is the llama architecture, whose tiny variant every llama recipe's test runs)
    [("Qwen3-8B", "qwen3"), ("Mistral-7B-Instruct-v0.3", "mistral"), ("gemma-2-9b-it", "gemma")],
)  # fmt: skip
def test_a_recipe_on_todays_families_runs_as_its_tiny_variant_and_exports(
    tmp_path: Path, base: str, template: str
):
    """A recipe starting from a 2024-25 base, run with --tiny: the tiny model of the base's family
    (tiny-llama, tiny-qwen3, tiny-mistral, tiny-gemma2, built with the family's template) trains with
    the family's template, exports, and the export renders with the published template's text."""
    from chatkit.conversation import Message
    from chatkit.models import get_model_spec
    from chatkit.templates import get_template

    recipe = tmp_path / f"{template}.yaml"
    recipe.write_text(
        (REPO / "config" / "tiny.yaml").read_text().replace("pretrained/tiny/model", f"pretrained/{base}/model")
        .replace("template: openchatkit", f"template: {template}")
    )  # fmt: skip
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "chatkit.launch", str(recipe), "--tiny", "--num-gpus", "0", "--master-port", "0",
           f"output_dir={out}", "save_every=4"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    arch = get_model_spec(base).architecture
    assert json.loads((out / "checkpoints" / "step4" / "config.json").read_text())["model_type"] == arch
    reply = _export_and_chat(out)
    assert isinstance(reply, str)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out / "hf")
    msgs = [Message("user", "What is 2 + 3?"), Message("assistant", "5")]
    ours = get_template(template, tok).render(msgs, tok.eos_token, tok.bos_token or "")
    assert tok.apply_chat_template([m.to_dict() for m in msgs], tokenize=False) == ours
