"""Meta LLaMA checkpoint conversion on real files, no mocks.

A seeded tiny `LlamaForCausalLM` is written in Meta's format the way Meta's code lays it out (Meta's
names, q/k rows in the interleaved rotary order, model-parallel slices per consolidated.NN.pth), with a
sentencepiece BPE model trained here. The converted folder must load in transformers with the same
weights and logits, and its tokenizer must give sentencepiece's ids.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chatkit.convert.meta_llama import compute_intermediate_size, convert_meta_llama, permute
from chatkit.convert.weights import WeightsError, hf_refs

REPO = Path(__file__).resolve().parents[1]
DIM, LAYERS, HEADS = 64, 2, 4
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "  Leading spaces,  double  spaces\tand a tab.\nA new line.",
    "Numbers 12345 and 3.14, unicode café naïve 🦙!",
    "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is a llama? [/INST]",
]
# Meta name -> (Hugging Face name, model-parallel split dim (None: replicated)); {i} is the layer.
META_TO_HF = {
    "tok_embeddings.weight": ("model.embed_tokens.weight", 1),
    "norm.weight": ("model.norm.weight", None),
    "output.weight": ("lm_head.weight", 0),
    "layers.{i}.attention.wq.weight": ("model.layers.{i}.self_attn.q_proj.weight", 0),
    "layers.{i}.attention.wk.weight": ("model.layers.{i}.self_attn.k_proj.weight", 0),
    "layers.{i}.attention.wv.weight": ("model.layers.{i}.self_attn.v_proj.weight", 0),
    "layers.{i}.attention.wo.weight": ("model.layers.{i}.self_attn.o_proj.weight", 1),
    "layers.{i}.feed_forward.w1.weight": ("model.layers.{i}.mlp.gate_proj.weight", 0),
    "layers.{i}.feed_forward.w3.weight": ("model.layers.{i}.mlp.up_proj.weight", 0),
    "layers.{i}.feed_forward.w2.weight": ("model.layers.{i}.mlp.down_proj.weight", 1),
    "layers.{i}.attention_norm.weight": ("model.layers.{i}.input_layernorm.weight", None),
    "layers.{i}.ffn_norm.weight": ("model.layers.{i}.post_attention_layernorm.weight", None),
}


# ---------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA-style sentencepiece model (BPE, byte fallback, identity normalisation, digits split)."""
    import sentencepiece as spm

    rng = random.Random(0)
    words = (
        "the quick brown fox jumps over lazy dog llama model weights shard tensor hello world chat "
        "assistant user answer question brief what is a be numbers and unicode new line spaces tab"
    ).split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    lines += SENTENCES[:1] + ["[INST] <<SYS>> <</SYS>> [/INST] 0123456789 café naïve"]
    folder = tmp_path_factory.mktemp("spm")
    (folder / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=400,
        model_type="bpe", byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, character_coverage=1.0,
        num_threads=1, minloglevel=2,
    )  # fmt: skip
    return folder / "tokenizer.model"


def _sp(path: Path):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(path))


def _params(n_kv_heads: int | None, ffn_dim_multiplier: float | None) -> dict:
    """params.json as Meta writes it (vocab_size -1: the tokenizer's)."""
    p = {
        "dim": DIM,
        "multiple_of": 32,
        "n_heads": HEADS,
        "n_layers": LAYERS,
        "norm_eps": 1e-05,
        "vocab_size": -1,
    }
    if n_kv_heads is not None:
        p |= {"n_kv_heads": n_kv_heads, "ffn_dim_multiplier": ffn_dim_multiplier}
    return p


def _tiny_llama(vocab: int, n_kv_heads: int, intermediate: int):
    """A seeded LlamaForCausalLM with every weight random (norms too, so a wrong norm would show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=DIM, intermediate_size=intermediate, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=n_kv_heads, rms_norm_eps=1e-5,
        max_position_embeddings=128, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.1 * noise if "norm" in name else 0.05 * noise)
    return model


def _unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Hugging Face's rotary halves back to Meta's interleaved pairs (the inverse of the converter's step)."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def _meta_shards(model, n_kv_heads: int, num_shards: int, dtype: torch.dtype) -> list[dict]:
    """The model's state dict in Meta's names and layout, sliced like Meta's model-parallel ranks."""
    hf = model.state_dict()
    shards: list[dict] = [{} for _ in range(num_shards)]
    for i in range(LAYERS):
        for meta_t, (hf_t, split) in META_TO_HF.items():
            if "{i}" not in meta_t and i:
                continue
            w = hf[hf_t.format(i=i)]
            if meta_t.endswith("wq.weight"):
                w = _unpermute(w, HEADS)
            elif meta_t.endswith("wk.weight"):
                w = _unpermute(w, n_kv_heads)
            parts = [w] * num_shards if split is None else list(w.chunk(num_shards, dim=split))
            for shard, part in zip(shards, parts, strict=True):
                shard[meta_t.format(i=i)] = part.to(dtype).clone()
    head_dim = DIM // HEADS
    for shard in shards:  # LLaMA-1 files carry the rotary frequencies; the converter drops them
        shard["rope.freqs"] = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return shards


def _write_meta(folder: Path, params: dict, shards: list[dict], tokenizer: Path | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    for r, shard in enumerate(shards):
        torch.save(shard, folder / f"consolidated.{r:02d}.pth")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, folder / "tokenizer.model")
    return folder


CASES = {  # name: (n_kv_heads in params (None: absent, = n_heads), ffn_dim_multiplier, shards)
    "mha-1shard": (None, None, 1),
    "mha-2shards": (None, None, 2),
    "gqa-2shards": (2, 1.3, 2),
    "gqa-1shard": (2, 1.3, 1),
}


@pytest.fixture(scope="module")
def meta_dirs(tmp_path_factory: pytest.TempPathFactory, spm_file: Path) -> dict:
    """name -> (Meta folder, original model) for every case in CASES, written once."""
    root, vocab, out = tmp_path_factory.mktemp("meta"), _sp(spm_file).get_piece_size(), {}
    for name, (kv, mult, n) in CASES.items():
        params = _params(kv, mult)
        inter = 224 if mult else 192  # 64 * 8/3 = 170 (x1.3 = 221), rounded up to multiple_of 32
        model = _tiny_llama(vocab, kv or HEADS, inter)
        shards = _meta_shards(model, kv or HEADS, n, torch.float32)
        out[name] = (_write_meta(root / name, params, shards, spm_file), model)
    return out


def _snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(f.relative_to(folder)): (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns)
        for f in sorted(folder.rglob("*"))
        if f.is_file()
    }


def _logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


# ---------------------------------------------------------------------------------------- tests


def test_intermediate_size_matches_meta_models():
    assert compute_intermediate_size(4096) == 11008  # 7B
    assert compute_intermediate_size(5120) == 13824  # 13B
    assert compute_intermediate_size(6656) == 17920  # LLaMA-1 33B
    assert compute_intermediate_size(8192, 1.3, 4096) == 28672  # Llama-2 70B


def test_permute_turns_interleaved_pairs_into_halves():
    # one head of 4 rows: Meta rotates rows (0, 1) and (2, 3); Hugging Face rotates (0, 2) and (1, 3)
    w = torch.arange(8.0).reshape(4, 2)
    assert permute(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    assert torch.equal(permute(_unpermute(w, 1), 1), w)


@pytest.mark.parametrize("case", list(CASES))
def test_converted_model_equals_the_original(case, meta_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    src, model = meta_dirs[case]
    before = _snapshot(src)
    result = convert_meta_llama(src, tmp_path / "hf", llama_version=2)
    hf = AutoModelForCausalLM.from_pretrained(result.out, dtype=torch.float32).eval()
    want = model.state_dict()
    got = hf.state_dict()
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], t), name
    ids = [[1, 5, 77, 300, 12, 9, 399, 4], [1, 250, 251, 252, 253, 254, 255, 256]]
    torch.testing.assert_close(_logits(hf, ids), _logits(model, ids), rtol=0, atol=1e-5)
    cfg = json.loads((result.out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == (CASES[case][0] or HEADS)
    assert cfg["max_position_embeddings"] == 4096 and cfg["tie_word_embeddings"] is False
    assert cfg["dtype"] == "float32" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((result.out / "chatkit.json").read_text())["template"] == "llama2"
    gen = json.loads((result.out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, 2)
    assert _snapshot(src) == before


def test_tokenizer_gives_sentencepiece_ids(meta_dirs, spm_file, tmp_path):
    from transformers import AutoTokenizer

    out = convert_meta_llama(meta_dirs["mha-1shard"][0], tmp_path / "hf", llama_version=2).out
    tok = AutoTokenizer.from_pretrained(out)
    sp = _sp(spm_file)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "</s>", None)
    for text in SENTENCES:
        ids = tok(text)["input_ids"]
        assert ids == [sp.bos_id(), *sp.encode(text)], text
        assert tok.decode(ids, skip_special_tokens=True) == sp.decode(sp.encode(text)) == text
    # Meta's chat format encodes every turn with bos=True: "<s>" then "▁[INST]", as the chat template renders
    meta = [
        sp.bos_id(),
        *sp.encode("[INST] hi [/INST] hello"),
        sp.eos_id(),
        sp.bos_id(),
        *sp.encode("[INST] ok"),
    ]
    assert tok("<s>[INST] hi [/INST] hello</s><s>[INST] ok", add_special_tokens=False)["input_ids"] == meta
    assert (out / "tokenizer.model").read_bytes() == spm_file.read_bytes()
    assert tok.model_max_length == 4096 and "[INST]" in tok.chat_template


def test_llama1_sets_its_context_and_template(meta_dirs, tmp_path):
    result = convert_meta_llama(meta_dirs["mha-2shards"][0], tmp_path / "hf", llama_version=1)
    assert json.loads((result.out / "config.json").read_text())["max_position_embeddings"] == 2048
    assert json.loads((result.out / "chatkit.json").read_text()) == {
        "template": "alpaca", "source": "meta", "llama_version": 1, "dtype": "fp32"
    }  # fmt: skip
    result = convert_meta_llama(
        meta_dirs["mha-2shards"][0], tmp_path / "hf2", llama_version=1, max_position_embeddings=999
    )
    assert json.loads((result.out / "config.json").read_text())["max_position_embeddings"] == 999


def test_small_shard_size_writes_shards_and_index(meta_dirs, tmp_path):
    src, model = meta_dirs["gqa-2shards"]
    result = convert_meta_llama(src, tmp_path / "hf", max_shard_size="100KB")
    names = sorted(p.name for p in result.out.glob("model*"))
    assert len(names) > 3 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    got = {r.name: r.load() for r in hf_refs(result.out)}
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items())


def test_dtype_is_kept_or_cast(meta_dirs, spm_file, tmp_path):
    src, model = meta_dirs["mha-2shards"]
    bf16 = convert_meta_llama(src, tmp_path / "bf16", dtype="bf16")
    refs = hf_refs(bf16.out)
    assert {r.dtype for r in refs} == {torch.bfloat16}
    assert json.loads((bf16.out / "config.json").read_text())["dtype"] == "bfloat16"
    fp16_src = _write_meta(
        tmp_path / "fp16src", _params(None, None), _meta_shards(model, HEADS, 2, torch.half), spm_file
    )
    kept = convert_meta_llama(fp16_src, tmp_path / "fp16")
    assert {r.dtype for r in hf_refs(kept.out)} == {torch.float16}
    assert json.loads((kept.out / "chatkit.json").read_text())["dtype"] == "fp16"


def test_tokenizer_is_found_in_the_parent_folder_or_given(meta_dirs, spm_file, tmp_path):
    src, model = meta_dirs["mha-1shard"]
    shards = [torch.load(src / "consolidated.00.pth", weights_only=True)]
    (tmp_path / "llama").mkdir()
    shutil.copyfile(
        spm_file, tmp_path / "llama" / "tokenizer.model"
    )  # Meta's layout: llama/{tokenizer.model,7B/}
    nested = _write_meta(tmp_path / "llama" / "7B", _params(None, None), shards, None)
    assert convert_meta_llama(nested, tmp_path / "a").vocab_size == model.config.vocab_size
    elsewhere = tmp_path / "spm.model"
    shutil.copyfile(spm_file, elsewhere)
    bare = _write_meta(tmp_path / "bare", _params(None, None), shards, None)
    assert (convert_meta_llama(bare, tmp_path / "b", tokenizer=elsewhere).out / "tokenizer.model").is_file()
    with pytest.raises(WeightsError, match="no tokenizer"):
        convert_meta_llama(bare, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_broken_inputs_are_named(meta_dirs, spm_file, tmp_path):
    src, model = meta_dirs["mha-2shards"]
    shards = _meta_shards(model, HEADS, 2, torch.float32)
    no_params = _write_meta(tmp_path / "np", _params(None, None), shards, spm_file)
    (no_params / "params.json").unlink()
    with pytest.raises(WeightsError, match=r"np/params\.json: not found"):
        convert_meta_llama(no_params, tmp_path / "o1")
    del shards[1]["layers.1.feed_forward.w2.weight"]
    missing = _write_meta(tmp_path / "mt", _params(None, None), shards, spm_file)
    with pytest.raises(
        WeightsError, match=r"consolidated\.01\.pth: tensor 'layers\.1\.feed_forward\.w2\.weight' is missing"
    ):
        convert_meta_llama(missing, tmp_path / "o2")
    wrong = _write_meta(
        tmp_path / "wr",
        _params(None, None) | {"multiple_of": 128},
        _meta_shards(model, HEADS, 2, torch.float32),
        spm_file,
    )
    with pytest.raises(
        WeightsError, match=r"w1\.weight joins to shape \[192, 64\], but params\.json .* \[256, 64\]"
    ):
        convert_meta_llama(wrong, tmp_path / "o3")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "params.json").write_text(json.dumps(_params(None, None)))
    with pytest.raises(WeightsError, match=r"no consolidated\.\*\.pth"):
        convert_meta_llama(empty, tmp_path / "o4")
    with pytest.raises(WeightsError, match="would replace input"):
        convert_meta_llama(src, src)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))
    assert not list(tmp_path.glob(".o*"))  # no temporary folders left behind


@pytest.mark.slow
def test_script_converts_and_reports_errors(meta_dirs, tmp_path):
    src, model = meta_dirs["gqa-2shards"]
    before = _snapshot(src)
    cmd = [sys.executable, "tools/convert_llama_weights_to_hf.py", "--input-dir", str(src), "--out",
           str(tmp_path / "hf"), "--llama-version", "2", "--bf16", "--max-shard-size", "200KB"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    got = {r.name: r.load() for r in hf_refs(tmp_path / "hf")}
    assert all(torch.equal(got[k], v.to(torch.bfloat16)) for k, v in model.state_dict().items())
    assert _snapshot(src) == before
    cmd = [sys.executable, "tools/convert_llama_weights_to_hf.py", "--input-dir", str(tmp_path / "nowhere"),
           "--out", str(tmp_path / "x"), "--llama-version", "2"]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "error:" in run.stderr and "nowhere/params.json" in run.stderr


MEMORY_PROBE = """
import sys
from pathlib import Path
from chatkit.convert.meta_llama import convert_meta_llama
from chatkit.convert.weights import peak_rss_bytes

warm, src, out = map(Path, sys.argv[1:])
convert_meta_llama(warm, out.with_name("warm"))  # imports, tokenizer conversion: not what is measured
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current resident size
base = peak_rss_bytes()
convert_meta_llama(src, out, max_shard_size="8MB")
print((peak_rss_bytes() - base) / 2**20)
"""


def test_memory_stays_near_one_output_shard(meta_dirs, spm_file, tmp_path):
    """84 MB of weights in 2 model-parallel files, written as 8 MB shards: the peak stays far below the
    model's size because each output shard's mapped pages are dropped before the next."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak resident size")
    dim, inter, layers, vocab = 512, 1536, 6, _sp(spm_file).get_piece_size()
    g = torch.Generator().manual_seed(0)
    shapes = {
        "tok_embeddings.weight": (vocab, dim // 2),
        "norm.weight": (dim,),
        "output.weight": (vocab // 2, dim),
    }
    for i in range(layers):
        for name, shape in {"wq": (dim // 2, dim), "wk": (dim // 2, dim), "wv": (dim // 2, dim),
                            "wo": (dim, dim // 2)}.items():  # fmt: skip
            shapes[f"layers.{i}.attention.{name}.weight"] = shape
        for name, shape in {
            "w1": (inter // 2, dim),
            "w3": (inter // 2, dim),
            "w2": (dim, inter // 2),
        }.items():
            shapes[f"layers.{i}.feed_forward.{name}.weight"] = shape
        shapes |= {f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,)}
    shards = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(2)]
    params = {
        "dim": dim,
        "n_layers": layers,
        "n_heads": 8,
        "multiple_of": 256,
        "norm_eps": 1e-5,
        "vocab_size": -1,
    }
    src = _write_meta(tmp_path / "big", params, shards, spm_file)
    del shards
    size = sum(f.stat().st_size for f in src.glob("*.pth")) / 2**20
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(meta_dirs["mha-1shard"][0]), str(src), str(tmp_path / "hf")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    peak = float(run.stdout.split()[-1])
    assert size > 75 and peak < 40, f"peak {peak:.1f} MiB above the start for {size:.0f} MiB of weights"


# ------------------------------------------------------------------ Llama's whitespace pieces (issue 12, item 2)


@pytest.fixture(scope="module")
def llama_layout_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8,000-piece LLaMA-style model with Meta's layout: space pieces at ids 259.., score -1e9."""
    import llama_spm

    if not llama_spm.ALPACA_FILE.is_file():
        pytest.skip(f"{llama_spm.ALPACA_FILE} not found (the model is trained on its texts)")
    return llama_spm.write_meta_tokenizer(
        tmp_path_factory.mktemp("llama-layout"), llama_spm.llama_layout_bytes()
    )


def test_llama_layout_model_has_meta_whitespace_pieces(llama_layout_model):
    sp = _sp(llama_layout_model)
    assert (sp.id_to_piece(258), sp.id_to_piece(259), sp.get_score(259)) == ("<0xFF>", "▁▁", -1e9)
    lengths = [len(sp.id_to_piece(i)) for i in range(259, 300) if set(sp.id_to_piece(i)) == {"▁"}]
    assert 16 in lengths and len(lengths) >= 8
    # what real Llama-2 gives (issue 12): the word piece is formed first, the space run last
    assert sp.encode(",  two", out_type=str) == ["▁", ",", "▁", "▁two"]


def test_id_ordered_merges_are_not_sentencepiece(llama_layout_model):
    """transformers' own conversion ranks merges by id: on Llama's layout it joins "▁▁" first."""
    from transformers import LlamaTokenizer

    tok = LlamaTokenizer(**LlamaTokenizer.convert_to_native_format(vocab_file=str(llama_layout_model)))
    pieces = tok.convert_ids_to_tokens(tok(",  two", add_special_tokens=False)["input_ids"])
    assert "▁▁" in pieces and pieces != _sp(llama_layout_model).encode(",  two", out_type=str)


def test_converter_tokenizer_gives_sentencepiece_ids_with_space_pieces(llama_layout_model):
    import llama_spm

    from chatkit.convert.meta_llama import build_tokenizer

    tok = build_tokenizer(llama_layout_model, 4096)  # its self-check runs TOKENIZER_PROBES
    sp = _sp(llama_layout_model)
    texts = [
        t for row in llama_spm.alpaca_rows() for t in (row["instruction"], row["input"], row["output"]) if t
    ]
    texts += llama_spm.WHITESPACE_TEXTS + llama_spm.space_run_texts() + ["", " ", "\n", "\t", "🦙"]
    assert len(texts) > 1000
    bad = [t for t in texts if tok(t)["input_ids"] != [sp.bos_id(), *sp.encode(t)]]
    assert not bad, f"{len(bad)} texts differ, e.g. {bad[:3]}"
    assert tok.convert_ids_to_tokens(tok(",  two")["input_ids"]) == ["<s>", "▁", ",", "▁", "▁two"]


def test_probes_cover_space_runs_tabs_digits_scripts_emoji():
    from chatkit.convert.meta_llama import TOKENIZER_PROBES

    joined = "".join(TOKENIZER_PROBES)
    assert " " * 17 in joined and "\t\t" in joined and "\n\n" in joined and "12345" in joined
    assert all(s in joined for s in ("你好", "Привет", "مرحبا", "🦙", "👩\u200d💻"))


@pytest.mark.slow
def test_script_accepts_a_tokenizer_with_space_pieces(llama_layout_model, tmp_path):
    """tools/convert_llama_weights_to_hf.py on a Meta folder whose tokenizer has Llama's space pieces."""
    from transformers import AutoTokenizer

    vocab = _sp(llama_layout_model).get_piece_size()
    model = _tiny_llama(vocab, HEADS, 192)
    src = _write_meta(
        tmp_path / "7B", _params(None, None), _meta_shards(model, HEADS, 1, torch.float32), None
    )
    cmd = [sys.executable, "tools/convert_llama_weights_to_hf.py", "--input-dir", str(src), "--out",
           str(tmp_path / "hf"), "--llama-version", "2", "--tokenizer", str(llama_layout_model)]  # fmt: skip
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    sp = _sp(llama_layout_model)
    for text in (",  two", "def f(x):\n    return  x", " " * 40 + "end"):
        assert tok(text)["input_ids"] == [sp.bos_id(), *sp.encode(text)], text


def test_converter_tokenizer_gives_meta_ids_on_rendered_llama2_text(llama_layout_model):
    """chatkit's llama2 text through the converted tokenizer gives the ids of Meta's chat_completion
    (llama/generation.py: every exchange encoded on its own between <s>/</s>), on multi-turn
    conversations with and without a system prompt and with runs of spaces in the messages."""
    import llama_spm

    from chatkit.conversation import Message
    from chatkit.convert.meta_llama import build_tokenizer
    from chatkit.templates import get_template

    tok = build_tokenizer(llama_layout_model, 4096)
    sp = _sp(llama_layout_model)
    tpl = get_template("llama2")
    rows = llama_spm.alpaca_rows()[:30]
    texts = [r["instruction"] + ("\n\n" + r["input"] if r["input"] else "") for r in rows]
    outs = [r["output"] for r in rows] + llama_spm.WHITESPACE_TEXTS
    convs = []
    for i in range(0, len(rows), 3):
        turns = [m for q, a in zip(texts[i : i + 3], outs[i : i + 3], strict=True) for m in (Message("user", q),
                 Message("assistant", a))]  # fmt: skip
        convs += [turns, [Message("system", "Be brief.  Use  two spaces."), *turns]]
    ws = llama_spm.WHITESPACE_TEXTS
    convs.append([m for t in ws for m in (Message("user", t), Message("assistant", t))])
    for msgs in convs:
        for gen in (False, True):
            text = tpl.render(msgs if not gen else msgs[:-1], "</s>", "<s>", add_generation_prompt=gen)
            assert tok(text, add_special_tokens=False).input_ids == llama_spm.sp_encode_pieces(sp, text), text
