"""Model configs: the DeiT presets, the quantization defaults, their validation, and the
float / quantized variants of one config that the stages build their models from."""

from __future__ import annotations

import copy
from typing import Any

import ml_collections

from ofq_jax import run_record
from ofq_jax.errors import UserError
from ofq_jax.models import quant_keys
from ofq_jax.quant import integer

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
}

PRECISIONS = ("highest", "high", "default")

FIELDS: dict[str, Any] = dict(
    size=None, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0, patch_size=16,
    img_size=224, in_chans=3, num_classes=1000,
    distilled=True,  # OFQ initialises from and distils from the distilled DeiTs.
    layer_norm_eps=1e-6,
    precision="highest",  # 'highest' keeps float32 (TF32 can flip 2-bit roundings, 7.10)
)
"""A DeiT config's fields besides ``quant``, at DeiT-T's values."""


def model_config(size: str | None = "tiny", **overrides: Any) -> ml_collections.ConfigDict:
  """DeiT config: a preset (``tiny``, ``small``, ``base`` or None) plus overrides.

  ``quant`` may be overridden with a dict that is merged into the defaults, e.g.
  ``model_config('small', quant=dict(enabled=True, weight_bits=2, act_bits=2))``.
  """
  return family_config("deit", FIELDS, PRESETS, size, overrides)


def family_config(family: str, fields: dict[str, Any], presets: dict[str, dict[str, Any]],
                  size: str | None, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A model family's config: its ``fields``, its ``quant`` defaults, then the preset
  ``size`` and the ``overrides`` (``apply_preset``)."""
  config = ml_collections.ConfigDict(dict(fields))
  config.quant = quant_keys.quant_defaults(family)
  return apply_preset(config, presets, size, family.capitalize() if family != "deit"
                      else "DeiT", overrides)


def check_patches_and_precision(config: ml_collections.ConfigDict) -> None:
  """What every family's config needs: whole patches and a known matmul precision."""
  if config.img_size % config.patch_size:
    raise UserError(f"img_size={config.img_size} is not divisible by patch_size="
                    f"{config.patch_size}; choose an image size that is a multiple of it.")
  if config.precision not in PRECISIONS:
    raise UserError(f"precision={config.precision!r} is not one of {PRECISIONS}.")


def apply_preset(config: ml_collections.ConfigDict, presets: dict[str, dict[str, Any]],
                 size: str | None, family: str, overrides: dict[str, Any]
                 ) -> ml_collections.ConfigDict:
  """``config`` with ``presets[size]`` and ``overrides`` applied (``quant`` merged into
  the defaults); an unknown size, field or quant field is an error naming the known ones."""
  config.size = size
  if size is not None:
    if size not in presets:
      raise UserError(f"Unknown {family} size {size!r}; use one of {sorted(presets)} or None.")
    config.update(presets[size])
  overrides = dict(overrides)
  quant_overrides = overrides.pop("quant", None)
  for key in overrides:
    if key not in config:
      raise KeyError(f"model_config got unknown field {key!r}; known fields: "
                     f"{sorted(config.keys())}.")
  config.update(overrides)
  if quant_overrides:
    for key in quant_overrides:
      if key not in config.quant:
        raise KeyError(f"model_config got unknown quant field {key!r}; known: "
                       f"{sorted(config.quant.keys())}.")
    config.quant.update(dict(quant_overrides))
  return config


def check_images(images: Any, config: ml_collections.ConfigDict, family: str) -> None:
  """NHWC images of the config's size, or a ValueError saying how to get them."""
  expected = (config.img_size, config.img_size, config.in_chans)
  if images.ndim != 4 or tuple(images.shape[1:]) != expected:
    raise ValueError(f"{family} expects NHWC images of shape (B, {expected[0]}, {expected[1]}, "
                     f"{expected[2]}), got {tuple(images.shape)}. Transpose NCHW inputs "
                     "with images.transpose(0, 2, 3, 1) or set img_size.")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the bad value and the fix."""
  if config.embed_dim % config.num_heads:
    raise UserError(f"embed_dim={config.embed_dim} is not divisible by num_heads="
                     f"{config.num_heads}; choose num_heads dividing embed_dim.")
  check_patches_and_precision(config)
  quant = config.quant
  quant_keys.check_quant(quant, "deit")
  check_qk_form(quant)
  if quant.enabled and quant.attention == "qkr" and quant.weight_method == "lsq":
    raise UserError("quant.weight_method='lsq' (the LSQ baseline) needs "
                     "quant.attention='standard'; QKR quantizes W_q^T W_k with StatsQ.")


def qk_form(quant: ml_collections.ConfigDict) -> str:
  """``quant.qk_form``; configs written before it existed (packed exports, model
  records) hold W_q and W_k, the ``'factors'`` form."""
  return quant.get("qk_form", "factors")


def check_qk_form(quant: ml_collections.ConfigDict) -> None:
  """``'product'`` parameterises QKR's W_qk: only QKR has one (the value itself is
  checked with the other keys, ``quant_keys.check_quant``)."""
  if qk_form(quant) == "product" and quant.attention != "qkr":
    raise UserError(f"model.quant.qk_form='product' holds QKR's W_q^T W_k as one parameter, "
                    f"but model.quant.attention={quant.attention!r} has no such product; use "
                    "attention='qkr' or qk_form='factors'.")


def with_qk_form(config: ml_collections.ConfigDict, form: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` whose QKR attention holds W_qk in ``form``
  (``quant_keys.QK_FORMS``)."""
  config = copy.deepcopy(config)
  config.quant.qk_form = form
  return config


def quantized_configs(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
  """The quantized config of ``config`` and, for QKR, the same in the other W_qk form: a
  quantized model directory may hold either (CGA with ``cga.include_qk`` saves W_qk)."""
  first = quantized_config(config)
  if first.quant.attention != "qkr":
    return [first]
  other = "factors" if qk_form(first.quant) == "product" else "product"
  return [first, with_qk_form(first, other)]


STORAGE_BLIND_KEYS = ("size", "precision", "drop_path") + quant_keys.STORAGE_BLIND_QUANT_KEYS
"""Model config keys that do not change what a stored model's tensors mean: how it runs
(precision, matmul), how training draws or scales (drop path, LSQ gradient batch, the
quantize-time inits), a preset's name, and what the loaders try both ways (float or
quantized, QKR's W_qk form)."""


def stored_model_differences(stored: ml_collections.ConfigDict,
                             asked: ml_collections.ConfigDict) -> list[str]:
  """``"quant.weight_bits: 2 stored, 4 asked"`` for every key where a stored model (a model
  directory, a packed file) and the config asked to read it disagree on what its tensors
  mean; a float model's ``quant.*`` (which says how it would be quantized) is not compared,
  nor a key only one side has (a field added later keeps its old behaviour as default)."""
  old, new = run_record.flatten(stored), run_record.flatten(asked)
  float_model = not stored.get("quant", {}).get("enabled", True)
  keys = sorted(k for k in set(old) & set(new) if k not in STORAGE_BLIND_KEYS
                and not (float_model and k.startswith("quant.")))
  return [f"{k}: {old[k]!r} stored, {new[k]!r} asked" for k in keys if old[k] != new[k]]


def resolve_platform_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a training ``config`` whose ``model.quant`` says what runs on the platform
  traced for (``'auto'`` matmul settings resolved, ``integer.PLATFORM_DEFAULTS``): what a
  run records (``run.json``) and resumes against, so a run started on a CPU and resumed
  on a TPU is told that its matmuls would change."""
  config = copy.deepcopy(config)
  quant = config.model.quant
  for key in ("matmul", "matmul_backward"):
    if key in quant:
      quant[key] = integer.resolve(key, quant[key])
  return config


def float_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with quantization switched off (the float model, the teacher)."""
  config = copy.deepcopy(config)
  config.quant.enabled = False
  return config


def quantized_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of ``config`` with quantization switched on (the QAT / CGA student)."""
  config = copy.deepcopy(config)
  config.quant.enabled = True
  return config
