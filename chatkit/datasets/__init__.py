"""Datasets: each turns its source rows into conversations (see chatkit.conversation)."""
