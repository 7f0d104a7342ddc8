"""Training text as token streams, and the batches of every step.

A text file becomes one token stream: its documents (split at blank lines) each encoded as
[BOS] + tokens, concatenated, as llama2.c pretokenizes TinyStories. A step's global batch is
B windows of T+1 tokens at offsets drawn from a generator seeded by (seed, step): the same
batch at any number of ranks, and a resumed run draws the batches the uninterrupted one
would have, with no loader state to save. Data-parallel rank r takes windows
[r B/n, (r+1) B/n).
"""
import re

import numpy as np

from ..checks import read_file
from ..errors import DllmError


def encode_text(tokenizer, text):
    """int32 token stream of `text`: each blank-line-separated document as [BOS] + ids."""
    stream = []
    for doc in re.split(r"\n\s*\n", text):
        if doc.strip():
            stream.append(tokenizer.bos_id)
            stream.extend(tokenizer.encode(doc, bos=False))
    return np.asarray(stream, dtype=np.int32)


def read_stream(path, tokenizer, seq_len, what="--text"):
    """The token stream of a text file; DllmError when it is too short for one window."""
    stream = encode_text(tokenizer, read_file(path, f"{what} file"))
    if len(stream) < seq_len + 1:
        raise DllmError(f"{what} {path} holds {len(stream)} tokens, fewer than one window of "
                        f"--seq-len {seq_len} + 1")
    return stream


def batch(stream, seed, step, global_batch, seq_len):
    """(global_batch, seq_len + 1) int64 windows of step `step`."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(stream) - seq_len, size=global_batch)
    return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int64)


def rank_rows(global_batch, rank, size):
    """The rows of the global batch data-parallel `rank` of `size` computes."""
    per = global_batch // size
    return slice(rank * per, (rank + 1) * per)


def validation_windows(stream, seq_len, limit):
    """Up to `limit` consecutive non-overlapping windows (n, seq_len + 1) from the start."""
    n = min(limit, (len(stream) - 1) // seq_len)
    return np.stack([stream[i * seq_len:i * seq_len + seq_len + 1]
                     for i in range(n)]).astype(np.int64)
