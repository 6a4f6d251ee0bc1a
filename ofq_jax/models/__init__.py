"""DeiT models (float and quantized) and the data-dependent LSQ calibration."""

from ofq_jax.models.calibrate import calibrate
from ofq_jax.models.deit import DeiT, Logits, create_model, model_config

__all__ = ["DeiT", "Logits", "calibrate", "create_model", "model_config"]
