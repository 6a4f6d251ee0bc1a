"""DeiT models (float and quantized), their configs and the data-dependent LSQ calibration."""

from ofq_jax.models.calibrate import calibrate
from ofq_jax.models.config import float_config, model_config, quantized_config
from ofq_jax.models.deit import DeiT, Logits, create_model

__all__ = ["DeiT", "Logits", "calibrate", "create_model", "float_config", "model_config",
           "quantized_config"]
