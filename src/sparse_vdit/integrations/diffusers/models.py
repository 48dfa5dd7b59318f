"""The diffusers classes other parts of sparse-vdit build on (the organism's model and samplers).

Only :mod:`sparse_vdit.integrations` imports diffusers; importing this module imports it.
"""

from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanTransformer3DModel
from diffusers import __version__ as DIFFUSERS_VERSION

__all__ = ["DIFFUSERS_VERSION", "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "WanTransformer3DModel"]
