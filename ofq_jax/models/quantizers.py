"""NNX holders of quantizer state: learned LSQ steps and the image quantizer's sign.

The numerics live in ``ofq_jax.quant``; these modules own the step parameters,
and, while ``calibrating`` is set (``ofq_jax.models.calibrate``), overwrite them
with the data-dependent initial value computed from the input they see.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ofq_jax.quant.lsq import (floored_step, lsq_fake_quant_dynamic, lsq_initial_step,
                               lsq_levels, lsq_quantize, lsq_range, shared_count)
from ofq_jax.quant.shapes import keep_axes_shape

IMAGE_SIGN_THRESHOLD = -1e-5
"""An image whose minimum is below this makes the image quantizer signed, for good."""


class QuantBuffer(nnx.Variable):
  """Non-trainable quantizer state (the reference's registered buffers)."""


class LsqQuantizer(nnx.Module):
  """LSQ fake quantization with a learned step indexed by ``keep_axes``.

  Args:
    bits: bit-width.
    signed: signed ``[-2^(b-1), 2^(b-1)-1]`` or unsigned ``[0, 2^b-1]`` range.
    step_shape: shape of the step parameter (the kept axes' sizes, ``(1,)`` per
      tensor).
    keep_axes: axes of the input that index the step.
    batch_axis: the input's batch axis (``None`` for weights); ``grad_batch``
      replaces its size in the gradient scale (spec item 7.6).
  """

  def __init__(self, bits: int, *, signed: bool, step_shape: tuple[int, ...],
               keep_axes: tuple[int, ...], batch_axis: int | None = 0,
               grad_batch: int | None = None):
    lsq_range(bits, signed)  # validates bits
    self.bits = bits
    self.signed = signed
    self.keep_axes = tuple(keep_axes)
    self.batch_axis = batch_axis
    self.grad_batch = grad_batch
    self.calibrating = False
    self.step = nnx.Param(jnp.ones(step_shape, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.calibrating:
      _, qp = lsq_range(self.bits, self.signed)
      _set(self.step, lsq_initial_step(x, qp=qp, keep_axes=self.keep_axes,
                                       factor=2.0 if self.signed else 4.0))
    return lsq_quantize(x, self.step[...], bits=self.bits, signed=self.signed,
                        keep_axes=self.keep_axes, grad_batch=self.grad_batch,
                        batch_axis=self.batch_axis)

  def levels(self, x: jax.Array) -> jax.Array:
    """The integer levels ``self(x)`` multiplies by the step: the same expression as the
    forward's, so that XLA computes it once for both."""
    qn, qp = lsq_range(self.bits, self.signed)
    step = jnp.reshape(self.step[...], keep_axes_shape(x.shape, self.keep_axes))
    return lsq_levels(x, step, jnp.asarray(qn, x.dtype), jnp.asarray(qp, x.dtype))

  def unit(self, shape: tuple[int, ...]) -> jax.Array:
    """The step an output of ``shape`` is an integer multiple of, broadcastable to it."""
    return jnp.reshape(floored_step(self.step[...]), keep_axes_shape(shape, self.keep_axes))

  @property
  def level_range(self) -> tuple[int, int]:
    return lsq_range(self.bits, self.signed)


class ImageQuantizer(nnx.Module):
  """Per-colour-channel LSQ of NHWC images with the reference's sticky sign.

  The range is unsigned until a batch with ``min < -1e-5`` is seen, in train or
  eval, and signed from then on; the forward that flips it already uses the
  signed range. Its data-dependent init always uses the factor 2 (spec 2.2).
  """

  def __init__(self, bits: int, channels: int, *, grad_batch: int | None = None):
    lsq_range(bits, True)
    self.bits = bits
    self.grad_batch = grad_batch
    self.calibrating = False
    self.step = nnx.Param(jnp.ones((channels,), jnp.float32))
    self.signed = QuantBuffer(jnp.zeros((1,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    seen_negative = (jnp.min(x) < IMAGE_SIGN_THRESHOLD).astype(self.signed.dtype)
    signed_flag = jnp.maximum(self.signed[...], seen_negative)
    self.signed[...] = signed_flag
    is_signed = signed_flag[0] > 0
    s_qn, s_qp = lsq_range(self.bits, True)
    u_qn, u_qp = lsq_range(self.bits, False)
    dtype = x.dtype  # constants follow the input (float32 or float64 end to end)
    qn = jnp.where(is_signed, jnp.asarray(s_qn, dtype), jnp.asarray(u_qn, dtype))
    qp = jnp.where(is_signed, jnp.asarray(s_qp, dtype), jnp.asarray(u_qp, dtype))
    keep_axes = (x.ndim - 1,)
    if self.calibrating:
      _set(self.step, lsq_initial_step(x, qp=qp, keep_axes=keep_axes, factor=2.0))
    count = shared_count(x.shape, keep_axes, grad_batch=self.grad_batch, batch_axis=0)
    grad_scale = 1.0 / jnp.sqrt(qp * count)
    return lsq_fake_quant_dynamic(x, self.step[...], keep_axes, qn, qp, grad_scale)


def _set(step: nnx.Param, value: jax.Array) -> None:
  """Writes a calibrated step in the parameter's own dtype (no silent promotion)."""
  step.set_value(value.astype(step.dtype))


def set_calibrating(model: nnx.Module, value: bool) -> int:
  """Sets ``calibrating`` on every LSQ holder in ``model``; returns how many."""
  count = 0
  for _, module in nnx.iter_modules(model):
    if isinstance(module, (LsqQuantizer, ImageQuantizer)):
      module.calibrating = value
      count += 1
  return count
