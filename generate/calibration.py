"""Temperature scaling of a scalar's posterior (Guo et al. 2017), fitted on held-out objects.

    T = fit_temperature(pipe, calibration_samples, ["image.des"], "scalar.redshift")
    post = pipe.predict(test_samples, ["image.des"], "scalar.redshift", temperature=T)

A small or briefly trained FM gives bin probabilities that are too broad or too sharp;
dividing its logits by one temperature T fixes most of that without moving the ranking of
the bins (the posterior median moves little). T minimises the mean negative log-likelihood
of the true bin over calibration objects, which must be held out from both the FM's
training set and the objects the calibrated posteriors are scored on. The fit is a grid
search in log T: one forward pass, then closed-form softmaxes.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .sampler import token_probabilities

TEMPERATURES = np.geomspace(0.2, 5.0, 65)     # 5% steps in T


def fit_temperature(pipe, samples: Sequence, given: Sequence[str], target: str,
                    grid: np.ndarray = TEMPERATURES) -> dict:
    """{'temperature': T, 'nll': at T, 'nll_t1': at T = 1, 'n': objects} for the objects of
    `samples` that hold `target` (their true bin is the tokenizer's encoding of it)."""
    have = [s for s in samples if target in s.records]
    if len(have) < 10:
        raise ValueError(f"fit_temperature: {len(have)} calibration objects hold {target!r}; need >= 10")
    truth = pipe.tokenizer(target).encode([s.records[target] for s in have])[:, 0].long()     # (N,)
    with torch.no_grad():
        logp = token_probabilities(pipe.model, pipe.tokenize(have, given), target, 1)[:, 0].clamp_min(1e-30).log()
    logits = logp.double()                                                                  # (N, V), up to a constant
    nll = np.array([float(-(logits / t).log_softmax(-1).gather(1, truth[:, None]).mean()) for t in grid])
    best = int(np.argmin(nll))
    return dict(temperature=float(grid[best]), nll=float(nll[best]),
                nll_t1=float(-logits.log_softmax(-1).gather(1, truth[:, None]).mean()), n=len(have))
