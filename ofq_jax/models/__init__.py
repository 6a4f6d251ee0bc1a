"""DeiT models (float and quantized) and the data-dependent LSQ calibration."""

from ofq_jax.models.calibrate import calibrate
from ofq_jax.models.deit import DeiT, create_model, model_config

__all__ = ["DeiT", "calibrate", "create_model", "model_config"]
