"""Data-dependent initialisation of every LSQ step size (spec 2.1, item 7.11)."""

from __future__ import annotations

import jax
from flax import nnx

from ofq_jax.models.quantizers import set_calibrating


@nnx.jit
def _forward(model: nnx.Module, images: jax.Array) -> jax.Array:
  # nnx.jit writes the steps set inside the forward back to ``model``.
  return model(images, train=False)


def calibrate(model: nnx.Module, images: jax.Array) -> nnx.Module:
  """Initialises every LSQ step of ``model`` from one batch of NHWC ``images``.

  As the reference's first forward pass: eval mode, layer after layer, so each
  quantizer sees the activations of already-initialised, already-quantizing
  upstream layers; the image quantizer also settles its sign on this batch.
  The reference uses one (augmented) training batch. Mutates and returns
  ``model``.
  """
  if set_calibrating(model, True) == 0:
    raise ValueError("calibrate() found no LSQ quantizer in this model; is "
                     "config.quant.enabled set?")
  try:
    _forward(model, images)
  finally:
    set_calibrating(model, False)
  return model
