"""A pipeline checkpoint in DeepSpeed's universal form, named as the model's own parameters.

The pipeline engine runs without ZeRO (DeepSpeed's pipeline takes ZeRO-1 at most, and chatkit's preset
uses stage 0), so each stage keeps a plain torch AdamW state in its `mp_rank_XX_model_states.pt`,
indexed by position, and DeepSpeed's `ds_to_universal` (which reads partitioned optimizer files)
cannot convert it. At every save, each stage's first data-parallel rank records its optimizer's
parameters in order, by their Hugging Face names (`optimizer_params_stageS.json`); this module joins
the stages' moments with those names into `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`, the
layout DeepSpeed's universal loader reads. The weights come from the per-layer files, which hold the
fp32 weights the optimizer updates (fp32 runs: the module is the master copy). A resume without a
pipeline (ZeRO 1-3, any number of ranks) then loads it as it loads a converted ZeRO checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from chatkit.convert.safe import torch_load_safe
from chatkit.convert.weights import TensorRef

NAMES = "optimizer_params_stage{}.json"


def stage_names(module, config) -> list[str]:
    """This stage's trainable parameters in the optimizer's order, by Hugging Face name."""
    from chatkit.convert.pipeline import hf_param_name

    names = [hf_param_name(config, n) for n, p in module.named_parameters() if p.requires_grad]
    if any(n is None for n in names):
        raise ValueError("a trainable pipeline parameter has no Hugging Face name")
    return names  # type: ignore[return-value]


def _stage_files(folder: Path) -> list[tuple[Path, list[str]]]:
    found = []
    for stage in range(len(list(folder.glob("mp_rank_*_model_states.pt")))):
        names = folder / NAMES.format(stage)
        if not names.is_file():
            raise FileNotFoundError(
                f"{folder} has no {names.name}: it was saved by an older chatkit, which did not record the "
                "pipeline's parameter order; resume it at the layout it was saved at"
            )
        found.append((folder / f"mp_rank_{stage:02d}_model_states.pt", json.loads(names.read_text())))
    if not found:
        raise FileNotFoundError(f"{folder}: no mp_rank_XX_model_states.pt files")
    return found


Moments = tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(Hugging Face name, fp32 weight, exp_avg, exp_avg_sq, Adam step) of one parameter."""


def _torch_optimizer(folder: Path, weights: dict[str, TensorRef]) -> Iterator[Moments]:
    """fp32 runs: each stage's torch AdamW state, by position, in its mp_rank file (memory-mapped:
    pages are read as each parameter is written); the per-layer files hold the fp32 weights it updates."""
    for path, names in _stage_files(folder):
        optimizer = torch_load_safe(path)["optimizer"]
        indices = [i for g in optimizer["param_groups"] for i in g["params"]]
        if len(indices) != len(names):
            raise ValueError(f"{path.name}: {len(indices)} optimizer parameters, {len(names)} names recorded")
        for i, name in zip(indices, names, strict=True):
            state = optimizer["state"][i]
            yield name, weights[name].load(), state["exp_avg"], state["exp_avg_sq"], state["step"]


def _bf16_optimizer(folder: Path, weights: dict[str, TensorRef]) -> Iterator[Moments]:
    """bf16 runs: DeepSpeed's BF16_Optimizer keeps flat fp32 partitions per data-parallel rank
    (`bf16_zero_pp_rank_D_mp_rank_SS_optim_states.pt`) with each parameter's place in them by
    PipelineModule name (`param_slice_mappings`); a parameter split over ranks is joined in rank order.
    The files are memory-mapped, so a stage's partitions are read parameter by parameter, not held."""
    from chatkit.convert.pipeline import hf_param_name

    config = _config(folder)
    stages = sorted(
        {int(f.name.split("_mp_rank_")[1][:2]) for f in folder.glob("bf16_zero_pp_rank_*_optim_states.pt")}
    )
    for stage in stages:
        files = sorted(
            folder.glob(f"bf16_zero_pp_rank_*_mp_rank_{stage:02d}_optim_states.pt"),
            key=lambda f: int(f.name.removeprefix("bf16_zero_pp_rank_").split("_")[0]),
        )
        parts: dict[str, list[list[torch.Tensor]]] = {}
        steps: dict[str, torch.Tensor] = {}
        for f in files:
            osd = torch_load_safe(f)["optimizer_state_dict"]
            base = osd["base_optimizer_state"]["state"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                flat = (osd["single_partition_of_fp32_groups"][g], base[g]["exp_avg"], base[g]["exp_avg_sq"])
                for name, where in mapping.items():
                    frags = parts.setdefault(name, [[], [], []])
                    for k, t in enumerate(flat):
                        frags[k].append(t.narrow(0, where.start, where.numel))
                    steps[name] = base[g]["step"]
        for name, (fp32, avg, avg_sq) in parts.items():
            hf = hf_param_name(config, name)
            if hf is None:
                continue
            shape = weights[hf].shape
            yield hf, *(torch.cat(t).view(shape) for t in (fp32, avg, avg_sq)), steps[name]


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def pipeline_to_universal(folder: Path, out: Path) -> None:
    """Write `out/zero/<name>/...`, `out/zero/optimizer_state.pt` and the run's state file."""
    from deepspeed.checkpoint.constants import DS_VERSION, OPTIMIZER_STATE_DICT, PARAM_GROUPS

    from chatkit.convert.pipeline import pipeline_refs

    refs, release = pipeline_refs(folder)  # the weights by name, read one layer file at a time
    weights = {r.name: r for r in refs}
    bf16 = bool(list(folder.glob("bf16_zero_pp_rank_*_optim_states.pt")))
    zero = out / "zero"
    step = None
    for name, fp32, avg, avg_sq, step in (_bf16_optimizer if bf16 else _torch_optimizer)(folder, weights):
        if (zero / name).exists():  # a tied embedding: the first and last stage hold equal copies
            continue
        if fp32.shape != avg.shape:
            raise ValueError(f"{name}: weight {tuple(fp32.shape)}, moments {tuple(avg.shape)}")
        (zero / name).mkdir(parents=True)
        for key, t in (("fp32", fp32), ("exp_avg", avg), ("exp_avg_sq", avg_sq)):
            torch.save({"param": t.float().clone()}, zero / name / f"{key}.pt")
        torch.save(step, zero / name / "step.pt")
    release()
    if step is None:
        raise ValueError(f"{folder}: no optimizer state found")
    first = torch_load_safe(folder / "mp_rank_00_model_states.pt")
    optimizer = first["optimizer"]
    inner = optimizer["base_optimizer_state"] if bf16 else optimizer
    groups = [{k: v for k, v in g.items() if k != "params"} | {"params": []} for g in inner[PARAM_GROUPS]]
    torch.save(
        {DS_VERSION: first[DS_VERSION], PARAM_GROUPS: groups,
         OPTIMIZER_STATE_DICT: {"state": {0: {"step": step}}, PARAM_GROUPS: groups}},
        zero / "optimizer_state.pt",
    )  # fmt: skip
    run_state = {**first, "optimizer": None, "module": None, "param_shapes": None, "mp_world_size": 1}
    torch.save(run_state, out / "mp_rank_00_model_states.pt")
