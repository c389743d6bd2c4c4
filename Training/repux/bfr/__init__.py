"""Bayesian frequency re-parameterization (BFR) of RepUX-Net's large depthwise kernels.

The prior m = alpha / (d + alpha) (:func:`frequency_prior`) sets how fast each kernel tap may
learn. Training a latent kernel V with W = m * V is done without a latent copy: the
optimizers :class:`BFRAdamW` and :class:`BFRSGD` update W directly along the exact
trajectory of the latent run, for parameter groups that carry ``"prior"``
(:func:`bfr_param_groups` builds them for a RepUX-Net, :func:`init_kernels_with_prior`
gives the matching start W0 = m * V0). The model holds W only: checkpoints and inference
are plain. Derivation and usage: ``docs/bfr.md``.
"""

from repux.bfr.groups import bfr_param_groups, init_kernels_with_prior
from repux.bfr.optim import BFRSGD, BFRAdamW
from repux.bfr.prior import frequency_prior

__all__ = ["frequency_prior", "BFRAdamW", "BFRSGD", "bfr_param_groups", "init_kernels_with_prior"]
