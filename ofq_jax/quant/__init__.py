"""Quantizers as pure functions: StatsQ weights, LSQ activations, and layer rules."""

from ofq_jax.quant.lsq import (lsq_fake_quant, lsq_initial_step, lsq_quantize, lsq_range,
                               shared_count, step_shape)
from ofq_jax.quant.statsq import (cga_frozen_mask, statsq_levels, statsq_pre_round,
                                  statsq_quantize, statsq_scale)

__all__ = [
    "cga_frozen_mask", "lsq_fake_quant", "lsq_initial_step", "lsq_quantize", "lsq_range",
    "shared_count", "statsq_levels", "statsq_pre_round", "statsq_quantize", "statsq_scale",
    "step_shape",
]
