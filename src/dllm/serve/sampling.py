"""The request's sampler: dllm.Sampler's draw (one uniform per token from a seeded stream,
so a seed gives dllm.generate's text) after OpenAI/vLLM's top_k and min_p filters. Root only.
"""
import numpy as np

from ..sampler import Sampler


class RequestSampler(Sampler):
    """temperature, top_p as dllm.Sampler; top_k (0: off) keeps the k most likely tokens,
    min_p (0: off) those at least min_p times as likely as the most likely one."""

    def __init__(self, temperature=0.0, top_p=1.0, seed=None, top_k=0, min_p=0.0):
        super().__init__(temperature, top_p, seed)
        self.top_k, self.min_p = int(top_k), float(min_p)

    def sample(self, logits):
        if self.temperature == 0 or (self.top_k <= 0 and self.min_p <= 0):
            return super().sample(logits)
        z = np.array(logits, np.float64)
        if 0 < self.top_k < len(z):
            kth = np.partition(z, len(z) - self.top_k)[len(z) - self.top_k]
            z[z < kth] = -np.inf
        if self.min_p > 0:
            # p_i >= min_p * p_max  <=>  z_i / T >= z_max / T + log(min_p)
            z[z / self.temperature < z.max() / self.temperature + np.log(self.min_p)] = -np.inf
        return super().sample(z)
