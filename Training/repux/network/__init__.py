"""RepUX-Net and 3D UX-Net, state_dict-compatible with the published code.

- :class:`RepUXNet`, :class:`UXNet`: the networks; ``.config`` rebuilds them.
- :func:`large_kernel_convs`: the depthwise kernels the Bayesian frequency prior acts on.
- :data:`ARCHITECTURES`, :func:`build_network`, :func:`config_from_state_dict`,
  :data:`NETWORK_PRESETS`: networks by name, from a config or from a checkpoint's shapes.
"""

from .blocks import ChannelsFirstLayerNorm, RepUXBlock, UXBlock, large_kernel_convs
from .encoder import HierarchicalEncoder
from .factory import ARCHITECTURES, NETWORK_PRESETS, build_network, config_from_state_dict
from .nets import SPATIAL_MULTIPLE, RepUXNet, UXNet

__all__ = [
    "ARCHITECTURES",
    "NETWORK_PRESETS",
    "SPATIAL_MULTIPLE",
    "ChannelsFirstLayerNorm",
    "HierarchicalEncoder",
    "RepUXBlock",
    "RepUXNet",
    "UXBlock",
    "UXNet",
    "build_network",
    "config_from_state_dict",
    "large_kernel_convs",
]
