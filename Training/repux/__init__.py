"""repux: RepUX-Net organ segmentation, Bayesian frequency re-parameterized training and model bundles.

Subpackages: ``network`` (RepUX-Net, 3D UX-Net), ``bfr`` (frequency prior and optimizers),
``data`` (phantoms, curated-case datasets), ``train``, ``infer``, ``bundle``, ``cli``.
"""

__version__ = "0.1.0"
