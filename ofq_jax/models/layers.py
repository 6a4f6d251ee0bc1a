"""DeiT building blocks that are float or quantized according to a QuantSpec.

One code path serves both: a layer whose spec is float has exactly the
parameters of its timm counterpart; a quantized one adds its step sizes and
"move" biases (spec 2.3) and fake-quantizes in the forward pass. Layouts are
Flax's: Dense kernels ``(in, out)``, conv kernels ``(kh, kw, in, out)``, images
NHWC, tokens ``(B, N, D)``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from ofq_jax import target
from ofq_jax.models.quantizers import ImageQuantizer, LsqQuantizer
from ofq_jax.models.rounded import Rounds, RoundsTensors
from ofq_jax.quant import integer
from ofq_jax.quant.rounding import weight_rounding
from ofq_jax.quant.rules import QuantSpec

Precision = jax.lax.Precision | str | None

default_kernel_init = nnx.initializers.truncated_normal(stddev=0.02)
"""timm's ViT init for Linear weights (``trunc_normal_(std=.02)``); biases are zero."""


def torch_default_linear_init(key: jax.Array, in_features: int, out_features: int
                              ) -> tuple[jax.Array, jax.Array]:
  """``nn.Linear``'s default init: kernel and bias ~ U(±1/sqrt(in)).

  The reference leaves ``attn.proj`` (and ``qkv`` of standard attention) at this
  init instead of loading the pretrained weights (spec item 7.1).
  """
  bound = 1.0 / jnp.sqrt(jnp.float32(in_features))
  k_key, b_key = jax.random.split(key)
  kernel = jax.random.uniform(k_key, (in_features, out_features), jnp.float32, -bound, bound)
  bias = jax.random.uniform(b_key, (out_features,), jnp.float32, -bound, bound)
  return kernel, bias


def dense(x: jax.Array, kernel: jax.Array, precision: Precision) -> jax.Array:
  """``x @ kernel`` over the last axis: one 2-D GEMM on a CPU, a dot over ``x``'s own
  axes elsewhere.

  XLA's CPU backend runs the weight gradient of a 3-D ``(B, N, C) @ (C, D)`` matmul
  (a contraction over two axes) far slower than the same product flattened to
  ``(B*N, C)``. On a TPU the flattening is a copy whenever ``N`` is not a multiple of
  the 8-row tile (DeiT's 198 tokens): a relayout of every activation and gradient.
  """
  if target.platform() != "cpu":
    return jnp.matmul(x, kernel, precision=precision)
  lead = x.shape[:-1]
  y = jnp.matmul(jnp.reshape(x, (-1, x.shape[-1])), kernel, precision=precision)
  return jnp.reshape(y, lead + (kernel.shape[-1],))


class Levels(NamedTuple):
  """A quantized operand's integer form: ``levels * unit + shift`` (see quant/integer.py)."""
  levels: jax.Array
  unit: jax.Array  # broadcastable to levels; size 1 on the contracted (last) axis
  shift: jax.Array  # (K,): the move bias added after the quantizer
  level_range: tuple[int, int]


class WeightLevels(NamedTuple):
  """A quantized kernel's integer form: ``kernel = unit * integers``."""
  integers: jax.Array  # (K, N), as floats
  unit: jax.Array  # (1, N): one per output column
  level_range: tuple[int, int]


def activation_levels(x: jax.Array, quantizer: LsqQuantizer, shift: jax.Array) -> Levels:
  """``quantizer(x) + shift`` as levels (``x``: the quantizer's input)."""
  return Levels(quantizer.levels(x), quantizer.unit(x.shape), shift, quantizer.level_range)


def quantized_dense(x: jax.Array, kernel: jax.Array, spec: QuantSpec,
                    x_levels: Levels | None = None, w_levels: WeightLevels | None = None,
                    product: str = "") -> jax.Array:
  """``x @ kernel``: on integer levels when ``integer.decide`` says so (integer mode, both
  operands quantized, sums exact for this depth); otherwise as float fake-quant
  (``dense`` at ``spec.precision``). ``product`` names it in ``integer.recording``."""
  how = integer.decide(spec, x.shape[-1], None if x_levels is None else x_levels.level_range,
                       None if w_levels is None else w_levels.level_range, x.dtype, product)
  if how is not None:
    return integer.integer_dense(x, kernel, x_levels.levels, x_levels.unit,
                                 x_levels.shift, w_levels.integers, w_levels.unit, how)
  return dense(x, kernel, spec.precision)


def move_bias(size: int | tuple[int, ...]) -> nnx.Param:
  """A zero-initialised learnable shift around an activation quantizer."""
  return nnx.Param(jnp.zeros(size if isinstance(size, tuple) else (size,), jnp.float32))


def kernel_rounds(spec: QuantSpec, kernel_shape: tuple[int, ...]) -> tuple[Rounds, ...]:
  """A kernel's declaration: one scale per output unit (the last axis), or nothing."""
  if not spec.quantize_weights:
    return ()
  rounding = weight_rounding(spec.weight_method, spec.weight_bits, len(kernel_shape))
  holder = "weight_quant" if spec.weight_method == "lsq" else None
  return (Rounds("kernel", rounding, param="kernel", holder=holder),)


def lsq_weight_quantizer(rounds: tuple[Rounds, ...], kernel_shape: tuple[int, ...]
                         ) -> LsqQuantizer | None:
  """The holder of an LSQ kernel's learned steps, built from its declaration."""
  if not rounds or rounds[0].holder is None:
    return None
  rounding = rounds[0].rounding
  keep_axes = rounding.keep_axes(len(kernel_shape))
  return LsqQuantizer(rounding.bits, signed=rounding.signed,
                      step_shape=tuple(kernel_shape[a] for a in keep_axes),
                      keep_axes=keep_axes, batch_axis=None)


class InputSteps(NamedTuple):
  """Where an input quantizer's learned steps vary: one per index of ``keep_axes`` of
  the input, ``shape`` their sizes (``per_token``, ``per_column``, ``PER_TENSOR``)."""
  keep_axes: tuple[int, ...]
  shape: tuple[int, ...]


PER_TENSOR = InputSteps((), (1,))
"""One step for the whole input (the classifier heads)."""


def per_token(tokens: int) -> InputSteps:
  """One step per token of a ``(B, N, C)`` input (DeiT's layers, Swin's windows)."""
  return InputSteps((1,), (tokens,))


def per_column(width: int) -> InputSteps:
  """One step per feature-map column of Swin's ``(B, H, W, C)`` maps."""
  return InputSteps((2,), (width,))


class QDense(nnx.Module, RoundsTensors):
  """Dense layer ``y = Q_a(x + b_pre) + b_post) @ Q_w(W) + b`` (spec 3.2, 3.6, 3.7).

  Args:
    in_features, out_features: sizes.
    spec: the layer's QuantSpec (float keeps a plain Dense); its ``precision`` and
      matmul keys say how the product runs.
    input_steps: granularity of the input quantizer's steps.
    input_signed: sign of the input quantizer (``fc2`` after GELU is unsigned).
    use_bias: False for a bias-free layer (Swin's float patch-merging reduction).
  """
  product_name = ""  # its module path, set by ``explain.products`` to name its decision

  def __init__(self, in_features: int, out_features: int, *, spec: QuantSpec, rngs: nnx.Rngs,
               input_steps: InputSteps, input_signed: bool = True, use_bias: bool = True):
    self.spec = spec
    self.kernel = nnx.Param(default_kernel_init(rngs.params(), (in_features, out_features)))
    self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
    self.weight_quant = lsq_weight_quantizer(self.rounds(), (in_features, out_features))
    self.input_quant = (LsqQuantizer(spec.act_bits, signed=input_signed,
                                     step_shape=input_steps.shape,
                                     keep_axes=input_steps.keep_axes,
                                     grad_batch=spec.grad_batch)
                        if spec.quantize_acts else None)
    if spec.quantize_acts:
      self.move_b4 = move_bias(in_features)
      self.move_aft = move_bias(in_features)

  def rounds(self) -> tuple[Rounds, ...]:
    return kernel_rounds(self.spec, self.kernel.shape)

  def quantized_kernel(self) -> jax.Array:
    """The kernel the forward pass multiplies with."""
    return self.rounded("kernel") if self.spec.quantize_weights else self.kernel[...]

  def quantize_input(self, x: jax.Array) -> tuple[jax.Array, Levels | None]:
    """The quantized input and its integer form (None when the input stays float)."""
    if self.input_quant is None:
      return x, None
    x = x + self.move_b4[...]
    shift = self.move_aft[...]
    return self.input_quant(x) + shift, activation_levels(x, self.input_quant, shift)

  def kernel_levels(self) -> WeightLevels | None:
    """The quantized kernel's unit per output column (None for a float kernel)."""
    rounds = self.rounds()
    if not rounds:
      return None
    unit = self.weight_unit("kernel")
    return WeightLevels(self.weight_integers("kernel"), jnp.reshape(unit, (1, -1)),
                        rounds[0].rounding.level_range)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.quantized_kernel()
    x, x_levels = self.quantize_input(x)
    y = quantized_dense(x, kernel, self.spec, x_levels, self.kernel_levels(),
                        self.product_name)
    return y if self.bias is None else y + self.bias[...]


class PatchEmbed(nnx.Module, RoundsTensors):
  """Non-overlapping conv patchify; W8A8 with per-pixel move biases when quantized.

  Tokens are the conv output flattened row-major, as timm does. The image
  quantizer's per-pixel biases are sized from ``img_size`` (the reference
  hard-codes 224 x 224).
  """

  def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int, *,
               spec: QuantSpec, rngs: nnx.Rngs):
    self.spec = spec
    self.patch_size = patch_size
    self.img_size = img_size
    shape = (patch_size, patch_size, in_chans, embed_dim)
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
    self.bias = nnx.Param(jnp.zeros((embed_dim,), jnp.float32))
    if spec.quantize_weights and spec.weight_method != "lsq":
      raise ValueError("The patch embedding supports LSQ weights only (reference: W8 "
                       f"LSQ per output channel); rule gave {spec.weight_method!r}. "
                       "Use e.g. 'patch_embed\\.proj=w8a8:lsq' or 'float'.")
    self.weight_quant = lsq_weight_quantizer(self.rounds(), shape)
    self.input_quant = (ImageQuantizer(spec.act_bits, in_chans, grad_batch=spec.grad_batch)
                        if spec.quantize_acts else None)
    if spec.quantize_acts:
      self.move_b4 = move_bias(img_size * img_size)
      self.move_aft = move_bias(img_size * img_size)

  def rounds(self) -> tuple[Rounds, ...]:
    return kernel_rounds(self.spec, self.kernel.shape)

  def _pixel_bias(self, bias: nnx.Param) -> jax.Array:
    return jnp.reshape(bias[...], (self.img_size, self.img_size, 1))

  product_name = ""  # as QDense's

  def __call__(self, images: jax.Array) -> jax.Array:
    integer.note(self.product_name, None,
                 "its image quantizer's steps are per pixel, on the contracted axis"
                 if self.spec.quantize_acts else "a float layer (quant.rules)")
    kernel = self.rounded("kernel") if self.spec.quantize_weights else self.kernel[...]
    x = images
    if self.input_quant is not None:
      x = self.input_quant(x + self._pixel_bias(self.move_b4)) + self._pixel_bias(self.move_aft)
    # A stride-p p x p conv is a GEMM over flattened patches (rows in (kh, kw, cin)
    # order, like the HWIO kernel); the GEMM form has a much faster backward on CPU.
    batch, height, width, chans = x.shape
    p = self.patch_size
    patches = jnp.reshape(x, (batch, height // p, p, width // p, p, chans))
    patches = jnp.reshape(jnp.transpose(patches, (0, 1, 3, 2, 4, 5)),
                          (batch, (height // p) * (width // p), p * p * chans))
    return dense(patches, jnp.reshape(kernel, (p * p * chans, -1)), self.spec.precision) + \
        self.bias[...]


class Mlp(nnx.Module):
  """fc1 -> exact (erf) GELU -> fc2; fc2's input quantizer is unsigned (spec 3.3)."""

  def __init__(self, dim: int, hidden: int, *, fc1_spec: QuantSpec, fc2_spec: QuantSpec,
               input_steps: InputSteps, rngs: nnx.Rngs):
    """``input_steps``: both inputs' (DeiT: per token; Swin: per feature-map column)."""
    common = dict(rngs=rngs, input_steps=input_steps)
    self.fc1 = QDense(dim, hidden, spec=fc1_spec, input_signed=True, **common)
    self.fc2 = QDense(hidden, dim, spec=fc2_spec, input_signed=False, **common)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(erf_gelu(self.fc1(x)))


def erf_gelu(x: jax.Array) -> jax.Array:
  """Exact GELU in torch's form ``x/2 * (1 + erf(x/sqrt2))``, constants in ``x``'s dtype.

  ``jax.nn.gelu(approximate=False)`` computes the same function through ``erfc``,
  whose two-branch expansion made it the costliest elementwise op of the CPU
  train step (6x ``erf``'s time); ``erf`` is also the reference's formula.
  """
  half = jnp.asarray(0.5, x.dtype)
  return half * x * (1 + jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))
