"""pretrained/<model>/prepare.py: real base models re-written as the Hugging Face folder the trainer reads.

Tiny models stand in for the real ones: a GPT-NeoX saved by transformers (safetensors, fast
tokenizer) and a Llama laid out as OpenLLaMA's repositories are (pytorch_model.bin, sentencepiece
tokenizer.model only, custom-code auto_map). The download path runs the real snapshot_download
offline against a Hugging Face cache built in tmp.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatkit.convert.weights import DTYPES, hf_refs
from chatkit.models import build_model, get_model_spec, list_models, spec_for_path
from chatkit.pretrained import DTYPE_NAMES, PretrainedError, prepare_base, prepare_main
from chatkit.templates import get_template

REPO = Path(__file__).resolve().parents[1]
REAL = [name for name in list_models() if get_model_spec(name).hf_id]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = [[5, 17, 42, 99, 3, 250, 7, 11]]


def _files(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file's sha256 and mtime: what "the source is untouched" compares."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return {r.name: r.load() for r in hf_refs(folder)}


def _logits(folder: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama as OpenLLaMA ships: pytorch_model.bin, tokenizer.model without tokenizer.json,
    plus an auto_map and a stale rotary buffer as older Llama checkpoints have."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = tmp_path_factory.mktemp("llama_src")
    texts = [f"the quick brown fox {i} jumps over the lazy dog, then asks: why {i * 7}?" for i in range(200)]
    sp = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=sp, vocab_size=320, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    (src / "tokenizer.model").write_bytes(sp.getvalue())
    tok_config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (src / "tokenizer_config.json").write_text(json.dumps(tok_config))
    tokenizer = AutoTokenizer.from_pretrained(src)
    spec = get_model_spec("tiny-llama")
    model = build_model(spec, tokenizer, seed=1, hidden_size=64, num_hidden_layers=2, intermediate_size=172)
    model.config.save_pretrained(src)
    model.generation_config.save_pretrained(src)
    config = json.loads((src / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_flash_llama.LlamaForCausalLM"}
    (src / "config.json").write_text(json.dumps(config))
    state = dict(model.state_dict())
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, src / "pytorch_model.bin")
    return src


def _hf_cache(root: Path, hf_id: str, files_from: Path) -> Path:
    """A Hugging Face hub cache holding `hf_id` at COMMIT (blobs, snapshot symlinks, refs/main)."""
    repo = root / f"models--{hf_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in files_from.iterdir():
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, blob)
        (snapshot / f.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return root


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """HF_HUB_OFFLINE=1 and a cache in tmp. huggingface_hub reads both at import, so the constants are
    patched too; prepare_base takes the cache as `cache_dir` (the subprocess test uses the variables)."""
    import huggingface_hub.constants

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


# --- from a local copy (--source) -----------------------------------------------------------------


def test_neox_source_copied_with_identical_weights_and_logits(tiny_model_dir: Path, tmp_path: Path):
    before = _files(tiny_model_dir)
    done = prepare_base("Pythia-6.9B-deduped", out=tmp_path / "out", source=tiny_model_dir)
    out = tmp_path / "out"
    assert done.out == out and done.tensors == len(hf_refs(tiny_model_dir))
    assert {"config.json", "tokenizer.json", "model.safetensors", "chatkit.json"} <= set(os.listdir(out))
    assert set(done.files) == set(os.listdir(out)) and done.total_bytes > 0
    assert json.loads((out / "chatkit.json").read_text()) == {
        "template": "openchatkit", "source": str(tiny_model_dir.resolve()), "revision": None,
    }  # fmt: skip
    src_t, out_t = _tensors(tiny_model_dir), _tensors(out)
    assert src_t.keys() == out_t.keys() and all(torch.equal(src_t[k], out_t[k]) for k in src_t)
    assert torch.equal(_logits(tiny_model_dir), _logits(out))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == get_template("openchatkit", tokenizer).chat_template
    assert _files(tiny_model_dir) == before
    assert "wrote" in done.summary() and "model.safetensors" in done.summary()


def test_llama_bin_source_becomes_safetensors_with_a_fast_tokenizer(llama_src: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    before = _files(llama_src)
    out = tmp_path / "open_llama_3b"
    done = prepare_base("open_llama_3b", out=out, source=llama_src)
    names = set(os.listdir(out))
    assert "model.safetensors" in names and "tokenizer.json" in names and "generation_config.json" in names
    assert not [n for n in names if n.endswith(".bin")]
    state = torch.load(llama_src / "pytorch_model.bin", weights_only=True)
    assert done.dropped == ("model.layers.0.self_attn.rotary_emb.inv_freq",)
    out_t = _tensors(out)
    assert out_t.keys() == state.keys() - set(done.dropped)
    assert all(torch.equal(out_t[k], state[k]) for k in out_t)
    assert "auto_map" not in json.loads((out / "config.json").read_text())
    assert torch.equal(_logits(llama_src), _logits(out))
    src_tok, out_tok = AutoTokenizer.from_pretrained(llama_src), AutoTokenizer.from_pretrained(out)
    text = "the lazy fox asks: why 42?"
    assert out_tok(text).input_ids == src_tok(text).input_ids
    assert out_tok.pad_token == "<unk>"  # Llama has none; batches need one
    assert out_tok.chat_template == get_template("alpaca", out_tok).chat_template
    assert json.loads((out / "chatkit.json").read_text())["template"] == "alpaca"
    assert _files(llama_src) == before


def test_dtype_cast_and_shards(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    prepare_base("GPT-NeoX-20B", out=out, source=tiny_model_dir, dtype="bf16", max_shard_size="100kB")
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    src_t, out_t = _tensors(tiny_model_dir), _tensors(out)
    assert all(torch.equal(out_t[k], src_t[k].to(torch.bfloat16)) for k in src_t)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16 and model(torch.tensor(PROMPT)).logits.shape[:2] == (1, 8)


# --- downloads, through the real snapshot_download, offline against a cache -----------------------


@pytest.mark.parametrize("name", ["Pythia-6.9B-deduped", "open_llama_3b"])
def test_download_from_the_hub_cache(
    name, offline: Path, tiny_model_dir: Path, llama_src: Path, tmp_path: Path, caplog
):
    spec = get_model_spec(name)
    src = tiny_model_dir if spec.architecture == "gpt_neox" else llama_src  # open_llama: .bin only
    _hf_cache(offline, spec.hf_id, src)
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="chatkit.pretrained"):
        done = prepare_base(name, out=out, cache_dir=offline)
    # a second pass for the .bin files only where the snapshot has no safetensors
    assert ("pytorch_model*.bin" in caplog.text) == (spec.architecture == "llama")
    assert done.source == spec.hf_id and done.revision == COMMIT
    meta = json.loads((out / "chatkit.json").read_text())
    assert meta == {"template": spec.template, "source": spec.hf_id, "revision": "main", "commit": COMMIT}
    out_t, src_t = _tensors(out), _tensors(src)
    assert all(torch.equal(out_t[k], src_t[k]) for k in out_t) and (out / "model.safetensors").is_file()


def test_download_not_in_the_cache_says_what_to_do(offline: Path, tmp_path: Path):
    with pytest.raises(PretrainedError, match=r"could not download EleutherAI/gpt-neox-20b.*--source DIR"):
        prepare_base("GPT-NeoX-20B", out=tmp_path / "out", cache_dir=offline)
    assert not (tmp_path / "out").exists()


def test_gated_repository_names_the_licence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    import httpx2
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError

    def gated(repo_id, **kwargs):
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise GatedRepoError(
            "Access to this model is restricted", response=httpx2.Response(403, request=request)
        )

    monkeypatch.setattr(huggingface_hub, "snapshot_download", gated)
    with pytest.raises(
        PretrainedError, match=r"is gated.*accept its licence at https://huggingface.co/meta-llama"
    ):
        prepare_base("Llama-2-13b-chat-hf", out=tmp_path / "out", token="hf_x")


# --- errors ---------------------------------------------------------------------------------------


def test_wrong_architecture_names_config_json(llama_src: Path, tmp_path: Path):
    before = _files(llama_src)
    with pytest.raises(PretrainedError) as e:
        prepare_base("Pythia-6.9B-deduped", out=tmp_path / "out", source=llama_src)
    assert str(llama_src / "config.json") in str(e.value) and "'llama'" in str(e.value)
    assert "gpt_neox" in str(e.value)
    assert not (tmp_path / "out").exists() and _files(llama_src) == before


def test_missing_config_json(tiny_model_dir: Path, tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    (src / "config.json").unlink()
    with pytest.raises(PretrainedError, match=r"config\.json: missing"):
        prepare_base("GPT-NeoX-20B", out=tmp_path / "out", source=src)
    with pytest.raises(PretrainedError, match="no such folder"):
        prepare_base("GPT-NeoX-20B", out=tmp_path / "out", source=tmp_path / "nowhere")


def test_out_never_overlaps_the_source(tiny_model_dir: Path, tmp_path: Path):
    src = tmp_path / "src"
    shutil.copytree(tiny_model_dir, src)
    before = _files(src)
    for out in (src, src / "model", tmp_path):
        with pytest.raises(PretrainedError, match="never modified"):
            prepare_base("GPT-NeoX-20B", out=out, source=src)
    assert _files(src) == before


def test_tiny_models_are_built_not_copied(tmp_path: Path):
    with pytest.raises(PretrainedError, match="pretrained/tiny/prepare.py"):
        prepare_base("tiny-llama", out=tmp_path / "out")


def test_command_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit, match=r"error: .*nowhere: no such folder"):
        prepare_main("open_llama_7b", ["--source", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        prepare_main("open_llama_7b", ["--max-shard-size", "lots"])
    assert e.value.code == 2 and "--max-shard-size" in capsys.readouterr().err


# --- the scripts ----------------------------------------------------------------------------------


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env or dict(os.environ),
    )


@pytest.mark.slow
def test_script_with_source(llama_src: Path, tmp_path: Path):
    proc = _run(
        "pretrained/open_llama_3b/prepare.py", "--source", str(llama_src), "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {tmp_path / 'o'}" in proc.stdout and "model.safetensors" in proc.stdout
    assert (tmp_path / "o" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_script_downloads_offline_from_hf_home(tiny_model_dir: Path, tmp_path: Path):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, read by huggingface_hub at import."""
    _hf_cache(tmp_path / "hf" / "hub", "EleutherAI/gpt-neox-20b", tiny_model_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env |= {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = _run("pretrained/GPT-NeoX-20B/prepare.py", "--out", str(tmp_path / "o"), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from EleutherAI/gpt-neox-20b at {COMMIT}" in proc.stdout


@pytest.mark.parametrize("name", REAL)
def test_every_real_model_has_a_script_with_help(name: str):
    script = f"pretrained/{name}/prepare.py"
    assert f'prepare_main("{name}"' in (REPO / script).read_text()
    proc = _run(script, "--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith(f"usage: {script}")
    for flag in ("--source", "--revision", "--out", "--dtype", "--max-shard-size", "--token"):
        assert flag in proc.stdout
    assert get_model_spec(name).hf_id in proc.stdout


# --- the registry's names -------------------------------------------------------------------------


def test_openchatkit_names_and_former_aliases():
    assert set(REAL) == {
        "Pythia-6.9B-deduped", "GPT-NeoX-20B", "Llama-2-7B-32K-beta", "open_llama_7b", "open_llama_3b",
        "Llama-2-13b-chat-hf", "llama-13b",
        "Llama-3.1-8B-Instruct", "Qwen3-8B", "Mistral-7B-Instruct-v0.3", "gemma-2-9b-it",
    }  # fmt: skip
    for old, new in [
        ("pythia-6.9b-deduped", "Pythia-6.9B-deduped"), ("gpt-neox-20b", "GPT-NeoX-20B"),
        ("llama-2-7b-32k", "Llama-2-7B-32K-beta"), ("open-llama-7b", "open_llama_7b"),
        ("llama-2-13b-chat", "Llama-2-13b-chat-hf"), ("OPEN_LLAMA_3B", "open_llama_3b"),
    ]:  # fmt: skip
        assert spec_for_path(f"pretrained/{old}/model").name == new
        assert get_model_spec(old).name == new
    assert spec_for_path("openlm-research/open_llama_3b").name == "open_llama_3b"
    s = get_model_spec("open_llama_3b")
    assert (s.architecture, s.template, s.params) == ("llama", "alpaca", 3_426_473_600)
    assert s.config == dict(
        hidden_size=3200, num_hidden_layers=26, intermediate_size=8640, max_position_embeddings=2048,
        num_attention_heads=32, vocab_size=32000, tie_word_embeddings=False,
    )  # fmt: skip
    assert set(DTYPE_NAMES) == set(DTYPES)


# --- Llama from the hub: sentencepiece's ids on chatkit's rendered text ------------------------------


@pytest.mark.parametrize("template", ["llama2", "koala", "vicuna", "alpaca"])
def test_llama_hub_tokenizer_gives_sentencepiece_ids(llama_src: Path, tmp_path: Path, template: str):
    """A Llama-2 hub folder (tokenizer.model, Llama-2's published tokenizer_config: legacy false) prepared
    and reloaded gives the ids Meta's code gives: each piece between <s>/</s> encoded by sentencepiece
    on its own (llama/generation.py chat_completion encodes every exchange separately), so the piece
    after a special token starts with "▁" ("<s>", "▁[" ...)."""
    import llama_spm
    from transformers import AutoTokenizer

    from chatkit.conversation import Message

    if not llama_spm.ALPACA_FILE.is_file():
        pytest.skip(f"{llama_spm.ALPACA_FILE} not found")
    src = tmp_path / "src"
    shutil.copytree(llama_src, src)
    for f in ("tokenizer_config.json", "tokenizer.model"):
        (src / f).unlink()
    llama_spm.write_hub_tokenizer(src)
    out = tmp_path / "out"
    prepare_base("open_llama_3b", out=out, source=src)
    tok = AutoTokenizer.from_pretrained(out)
    sp = llama_spm.processor()
    tpl = get_template(template)
    rows = llama_spm.alpaca_rows()[:40]
    convs = [[Message("user", r["instruction"]), Message("assistant", r["output"])] for r in rows]
    convs.append(
        [m for t in llama_spm.WHITESPACE_TEXTS for m in (Message("user", t), Message("assistant", t))]
    )
    for msgs in convs:
        for gen in (False, True):
            text = tpl.render(msgs if not gen else msgs[:-1], "</s>", "<s>", add_generation_prompt=gen)
            assert tok(text, add_special_tokens=False).input_ids == llama_spm.sp_encode_pieces(sp, text)
    assert tok.pad_token == "<unk>"


@pytest.mark.parametrize(
    ("name", "tiny"),
    [("Llama-3.1-8B-Instruct", "tiny-llama"), ("Qwen3-8B", "tiny-qwen3"),
     ("Mistral-7B-Instruct-v0.3", "tiny-mistral"), ("gemma-2-9b-it", "tiny-gemma2")],
)  # fmt: skip
def test_todays_families_prepare_with_their_own_templates(name: str, tiny: str, tmp_path: Path):
    """A source of each 2024-25 family (its tiny stand-in, saved as transformers saves the real one)
    becomes a base with the same weights and logits, whose tokenizer carries the family's template:
    the registry's published chat template, rendering what chatkit trains on."""
    from transformers import AutoTokenizer

    from chatkit.conversation import Message
    from chatkit.models import train_tokenizer

    spec = get_model_spec(name)
    template = get_template(spec.template)
    texts = [f"turn {i}: the weather in city {i % 7} is {i * 3} degrees" for i in range(300)]
    tokenizer = train_tokenizer(texts, 400, extra_tokens=template.special_tokens)
    src = tmp_path / "src"
    build_model(get_model_spec(tiny), tokenizer, seed=2).save_pretrained(src, safe_serialization=True)
    tokenizer.save_pretrained(src)
    done = prepare_base(name, out=tmp_path / "out", source=src)
    out = done.out
    assert json.loads((out / "chatkit.json").read_text())["template"] == spec.template
    assert torch.equal(_logits(src), _logits(out))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == get_template(spec.template, tok).chat_template
    msgs = [Message("user", "What is the weather in city 3?"), Message("assistant", "9 degrees.")]
    ours = get_template(spec.template, tok).render(msgs, tok.eos_token, tok.bos_token or "")
    theirs = tok.apply_chat_template([m.to_dict() for m in msgs], tokenize=False)
    assert ours == theirs and "city 3" in ours
