"""Choosing the next token from logits: greedy, temperature, top-p (nucleus). Root only.

One uniform draw per token from a seeded generator, as llama2.c does, so the random stream
does not depend on the logits: with the same seed and (near-)equal logits every world size
picks the same tokens.
"""
import numpy as np

from .errors import DllmError


class Sampler:
    def __init__(self, temperature=0.0, top_p=1.0, seed=None):
        if not (temperature >= 0 and np.isfinite(temperature)):
            raise DllmError(f"--temperature must be a finite number >= 0, got {temperature}")
        if not 0 < top_p <= 1:
            raise DllmError(f"--top-p must be in (0, 1], got {top_p}")
        self.temperature, self.top_p, self.seed = float(temperature), float(top_p), seed
        self.rng = np.random.default_rng(seed)

    def sample(self, logits):
        """logits (vocab,) float -> token id."""
        if self.temperature == 0:
            return int(np.argmax(logits))
        probs = _softmax(np.asarray(logits, np.float64) / self.temperature)
        coin = self.rng.random()
        if self.top_p < 1:
            return _sample_top_p(probs, self.top_p, coin)
        return int(min(np.searchsorted(np.cumsum(probs), coin * probs.sum(), side="right"),
                       len(probs) - 1))


def _softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def _sample_top_p(probs, top_p, coin):
    """Sample from the smallest set of most likely tokens whose mass reaches top_p."""
    order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    keep = int(np.searchsorted(cumulative, top_p)) + 1
    kept = cumulative[:keep]
    choice = int(np.searchsorted(kept, coin * kept[-1], side="right"))
    return int(order[min(choice, keep - 1)])
