"""AdamW with linear warm-up and cosine decay, and global-norm gradient clipping.

Pure functions over numpy arrays: the training loop owns the state (first and second
moments, one pair per tensor part this rank holds, so tensor-parallel state is sharded with
the weights) and the step count. Defaults are those tinystories-1m was trained with
(../shared/DATA.md section 6.3): betas 0.9/0.95, eps 1e-8, weight decay 0.1 on matrices only,
clipping at norm 1, minimum learning rate a tenth of the peak.
"""
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class AdamW:
    lr: float
    warmup: int
    steps: int
    min_lr_ratio: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip: float = 1.0      # max global gradient norm; 0 = no clipping

    def lr_at(self, step):
        """Learning rate of step (1-based): linear warm-up to lr over `warmup` steps, then
        cosine decay to min_lr_ratio * lr at `steps`."""
        if step <= self.warmup:
            return self.lr * step / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        floor = self.min_lr_ratio * self.lr
        return floor + 0.5 * (self.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))

    def clip_scale(self, norm):
        """Factor the gradients are multiplied by so that their global norm is <= clip."""
        if self.clip <= 0 or norm <= self.clip:
            return 1.0
        return self.clip / (norm + 1e-6)

    def update(self, param, grad, m, v, step, lr):
        """One AdamW step of one tensor, in place: param, m, v float32 of one shape.

        Decoupled weight decay (Loshchilov & Hutter) on matrices only; bias-corrected
        moments of the 1-based step."""
        m *= self.beta1
        m += (1 - self.beta1) * grad
        v *= self.beta2
        v += (1 - self.beta2) * np.square(grad)
        m_hat = m / (1 - self.beta1 ** step)
        v_hat = v / (1 - self.beta2 ** step)
        if param.ndim > 1 and self.weight_decay:
            param *= np.float32(1 - lr * self.weight_decay)
        param -= np.float32(lr) * m_hat / (np.sqrt(v_hat) + np.float32(self.eps))


def squared_norm(grads, names):
    """Sum of squares of the named gradients, float64."""
    return sum(float(np.dot(grads[n].ravel().astype(np.float64),
                            grads[n].ravel().astype(np.float64))) for n in names)
