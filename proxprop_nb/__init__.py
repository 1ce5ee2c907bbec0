__version__ = "0.1.0"
"""proxprop_nb: Proximal Backpropagation (Frerix et al., ICLR 2018) for modern PyTorch."""
from .layers import ProxPropLinear, ProxPropConv2d, proxprop_module, proxpropify, unproxpropify
from .graph import StepGraph

__all__ = ['ProxPropLinear', 'ProxPropConv2d', 'proxprop_module', 'proxpropify', 'unproxpropify', 'StepGraph']
