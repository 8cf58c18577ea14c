"""The architecture records are the one source: the plan (`--dry-run`) and training agree on LoRA.

For every recipe with LoRA, its `--tiny` variant, and LoRA on every registry model, the plan's printed
targets are the ones training passes to PEFT, and its printed trainable count is the count of
`requires_grad` parameters PEFT leaves on the model, built on the meta device (no weights, no memory)
from the registry entry's shape.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from chatkit import launch
from chatkit.architectures import ALL_LINEAR, ARCHITECTURES, get_architecture, resolve_lora_targets
from chatkit.config import TrainConfig, load_config
from chatkit.models import get_model_spec, list_models, spec_for_path

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.stem for p in (REPO / "config").glob("*.yaml"))
LORA_RECIPES = [r for r in RECIPES if load_config(f"{REPO}/config/{r}.yaml", check_files=False).lora_r > 0]
REAL = [name for name in list_models() if get_model_spec(name).hf_id]

# (recipe, extra launcher arguments): the LoRA recipes as they are and as their --tiny variants, and
# LoRA with the family's default targets on every registry model (the tiny ones included).
CASES = [
    *[(r, ()) for r in LORA_RECIPES],
    *[(r, ("--tiny",)) for r in LORA_RECIPES],
    *[("tiny", ("lora_r=8", f"model=pretrained/{name}/model")) for name in list_models()],
    *[("tiny", ("--tiny", "lora_r=4", f"model=pretrained/{a.tiny}/model")) for a in ARCHITECTURES.values()],
]


def _dry_run(capsys, monkeypatch, recipe: str, *argv: str) -> tuple[TrainConfig, str]:
    """chatkit.launch --dry-run in-process: (the resolved config, the plan text)."""
    monkeypatch.delenv("CHATKIT_CPU_RANKS", raising=False)
    monkeypatch.chdir(REPO)
    launch.main([f"config/{recipe}.yaml", "--num-gpus", "0", *argv, "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    start, plan, end = (lines.index(f"# {s}") for s in ("resolved config", "plan", "command"))
    return TrainConfig(**yaml.safe_load("\n".join(lines[start + 1 : plan]))), "\n".join(lines[plan + 1 : end])


def _printed(plan: str) -> tuple[list[str], int]:
    """The targets and the trainable count the plan prints."""
    targets = re.search(r"^adapters: .* on (\S+)", plan, re.M)
    trainable = re.search(r"^trainable: ([\d,]+) of \S+ parameters", plan, re.M)
    assert targets and trainable, plan
    return targets[1].split(","), int(trainable[1].replace(",", ""))


def _meta_model(config: dict):
    """The causal LM of a Hugging Face config (with model_type), every tensor on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {k: v for k, v in config.items() if k != "model_type"}
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(config["model_type"], **shape))


def _peft_trainable(model, r: int, targets) -> int:
    """PEFT's LoRA on `model` (its adapters made on the meta device too): the parameters that train."""
    from peft import LoraConfig, get_peft_model

    with torch.device("meta"):
        model = get_peft_model(model, LoraConfig(r=r, target_modules=targets))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _entry_config(model: str) -> dict:
    spec = spec_for_path(model)
    return {"model_type": spec.architecture, **spec.config}


def _case_id(case) -> str:
    recipe, argv = case
    return "+".join([recipe, *(a.removeprefix("model=pretrained/").removesuffix("/model") for a in argv)])


def test_some_recipe_trains_lora():
    assert "llama2-koalpaca-qlora" in LORA_RECIPES


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_plan_agrees_with_peft(case, capsys, monkeypatch):
    recipe, argv = case
    cfg, plan = _dry_run(capsys, monkeypatch, recipe, *argv)
    assert cfg.lora_r > 0
    model = _meta_model(_entry_config(cfg.model))
    targets = resolve_lora_targets(cfg, model.config.model_type)  # what apply_adapters passes to PEFT
    printed_targets, printed_trainable = _printed(plan)
    assert printed_targets == targets
    assert printed_trainable == _peft_trainable(model, cfg.lora_r, targets)


@pytest.mark.parametrize("case", CASES[: 2 * len(LORA_RECIPES)], ids=_case_id)
def test_plan_agrees_with_apply_adapters(case, capsys, monkeypatch):
    """The trainer's own apply_adapters (k-bit preparation and checkpointing off: they train nothing)."""
    from dataclasses import replace

    from chatkit.train.adapters import apply_adapters

    cfg, plan = _dry_run(capsys, monkeypatch, *case[:1], *case[1])
    model = _meta_model(_entry_config(cfg.model))
    with torch.device("meta"):
        model = apply_adapters(model, replace(cfg, quantize="", gradient_checkpointing=False))
    assert _printed(plan)[1] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_a_base_outside_the_registry_is_planned_from_its_config(capsys, monkeypatch, tmp_path: Path):
    config = dict(model_type="llama", hidden_size=96, num_hidden_layers=3, num_attention_heads=6,
                  num_key_value_heads=2, intermediate_size=256, vocab_size=300)  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, plan = _dry_run(capsys, monkeypatch, "tiny", "lora_r=8", f"model={tmp_path}")
    assert f"model: {tmp_path} (llama, not in chatkit.models: about " in plan
    targets, trainable = _printed(plan)
    assert targets == list(get_architecture("llama").lora_targets)
    assert trainable == _peft_trainable(_meta_model(config), 8, targets)  # grouped-query k and v included


def test_an_unknown_family_trains_all_linear_and_the_plan_says_so(capsys, monkeypatch, tmp_path: Path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "phi3", "hidden_size": 64}))
    for model, why in [
        ("somewhere/else/model", "the base's family is unknown"),
        (str(tmp_path), "chatkit.architectures has no record of 'phi3'"),
    ]:
        cfg, plan = _dry_run(capsys, monkeypatch, "tiny", "lora_r=8", f"model={model}")
        assert resolve_lora_targets(cfg, "phi3") == ALL_LINEAR
        assert f"on {ALL_LINEAR} (PEFT's: every linear layer but the head)\ntrainable: unknown ({why}" in plan
    cfg, plan = _dry_run(
        capsys, monkeypatch, "tiny", "lora_r=8", "lora_targets=[q_proj]", f"model={tmp_path}"
    )
    assert resolve_lora_targets(cfg, "phi3") == ["q_proj"] and " on q_proj\n" in plan


def test_the_plan_warns_of_targets_no_layer_has(capsys, monkeypatch):
    _, plan = _dry_run(capsys, monkeypatch, "tiny", "lora_r=8", "lora_targets=[dense,q_proj]")
    assert "warning: lora_targets ['q_proj']: no linear module of a gpt_neox decoder layer" in plan
    spec = get_model_spec("tiny")
    assert _printed(plan)[1] == get_architecture("gpt_neox").lora_params(spec.config, 8, ["dense"])
    _, plan = _dry_run(capsys, monkeypatch, "tiny", "lora_r=8", "lora_targets=[q_proj]")
    assert "and stops when no target matches" in plan and _printed(plan)[1] == 0  # not the defaults


def test_full_fine_tuning_plans_every_weight(capsys, monkeypatch):
    _, plan = _dry_run(
        capsys, monkeypatch, "Pythia-Chat-Base-7B", "--num-gpus", "8"
    )  # its fp16, 4 stages: GPUs
    assert "adapters: none (every weight trains)\ntrainable: every weight, 6.86B parameters" in plan


@pytest.mark.parametrize("name", list_models())
def test_linear_shapes_are_the_models(name: str):
    """The record's shapes of one decoder layer's linear modules are those transformers builds."""
    config = _entry_config(name)
    model = _meta_model(config)
    arch = get_architecture(config["model_type"])
    layer = getattr(model, arch.base).layers[0]
    built = {
        n.rpartition(".")[2]: (m.in_features, m.out_features)
        for n, m in layer.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert built == arch.linear_shapes(config)


@pytest.mark.parametrize("name", REAL)
def test_real_entries_have_the_real_shape(name: str):
    """Built from the registry's config values, a real entry has its card's parameter count exactly."""
    spec = get_model_spec(name)
    assert sum(p.numel() for p in _meta_model(_entry_config(name)).parameters()) == spec.params


@pytest.mark.parametrize("arch", ARCHITECTURES.values(), ids=lambda a: a.model_type)
def test_every_architecture_has_its_tiny_model(arch):
    spec = get_model_spec(arch.tiny)
    assert spec.hf_id is None and spec.architecture == arch.model_type
    model = _meta_model(_entry_config(arch.tiny))
    assert model.config.model_type == arch.model_type
    base = getattr(model, arch.base)  # where the pipeline engine and its checkpoint reader look
    for name in (arch.embed, arch.norm):
        assert isinstance(getattr(base, name), torch.nn.Module)
    assert isinstance(getattr(model, arch.head), torch.nn.Linear)
    assert arch.embed_dropout is None or hasattr(base, arch.embed_dropout)
    assert set(arch.lora_targets) == set(arch.linear_shapes(spec.config))  # every linear layer, by default


def test_tiny_shape_rule():
    assert get_architecture("gpt_neox").intermediate_size(64) == 256
    assert get_architecture("llama").intermediate_size(48) == 128
    assert get_architecture("llama").intermediate_size(4096) == 10922  # 8/3 x; Llama rounds up to 11008
    assert (
        get_architecture("gpt_neox").intermediate_size(128)
        == get_model_spec("tiny").config["intermediate_size"]
    )


def test_the_pipeline_engine_refuses_a_family_it_cannot_split():
    """Gemma 2 scales its embeddings and soft-caps its logits outside the modules a stage holds: a
    pipeline of it would train another model, so it is refused in one line."""
    from chatkit.train.pipeline_model import layer_specs

    assert not get_architecture("gemma2").pipeline
    assert all(a.pipeline for a in ARCHITECTURES.values() if a.model_type != "gemma2")
    with pytest.raises(ValueError, match="cannot split a gemma2 model"):
        layer_specs(_meta_model(_entry_config("tiny-gemma2")))
