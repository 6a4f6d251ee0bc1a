"""Checkpoints in and out: timm / FB DeiT (float) and the OFQ reference (quantized).

The stable API that notebooks, scripts and outside tools rely on:
``load_timm_deit``, ``export_timm_deit``, ``quantize_from_float``,
``load_ofq_torch``, ``export_ofq_torch``; torchvision Swin: ``load_torchvision_swin``,
``export_torchvision_swin``; either family: ``load_float``, ``export_float``.
"""

from ofq_jax.interop.checkpoints import (CheckpointMismatchError, export_float,
                                         export_ofq_torch, export_timm_deit, float_format,
                                         load_float, load_ofq_torch, load_timm_deit)
from ofq_jax.interop.files import read_state_dict
from ofq_jax.interop.quantize import quantize_from_float
from ofq_jax.interop.torchvision_swin import export_torchvision_swin, load_torchvision_swin

__all__ = [
    "CheckpointMismatchError", "export_ofq_torch", "export_timm_deit", "load_ofq_torch",
    "load_timm_deit", "quantize_from_float", "read_state_dict", "load_torchvision_swin",
    "export_torchvision_swin", "load_float", "export_float", "float_format",
]
