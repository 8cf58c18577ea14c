"""Retrieval over any documents: passages, encoders, Faiss indexes, and the chat-side retriever.

    passages.py  read text/Markdown/JSONL/parquet, split into ~3-sentence passages, the passage table
    embed.py     encoders: sentence-transformers (default all-MiniLM-L6-v2, offline) and contriever
    index.py     Faiss index chosen by corpus size; build, add, save atomically, load with checks
    build.py     build_index(): documents -> index folder (what retrieval/build_index.py runs)
    context.py   Retriever (search + OpenChatKit's neighbouring-passage expansion), fitting passages to
                 the model's context, the chat hook (context_provider) and what /context shows

Heavy imports (faiss, torch, sentence-transformers) happen inside the functions that need them.
Importing this package quiets those dependencies' loader chatter (chatkit.quiet.quiet_dependencies).
"""

from chatkit.quiet import quiet_dependencies
from chatkit.retrieval.passages import Passage, RetrievalError

quiet_dependencies()

__all__ = ["Passage", "RetrievalError"]
