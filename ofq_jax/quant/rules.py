"""Which layer is quantized how: ordered (regex, spec) rules on module paths.

Module paths are each family's (its module docstring and its ``FAMILY`` declaration:
``ofq_jax.models.deit``, ``ofq_jax.models.swin``); an attention's path covers everything
inside it except its output projection (the QKR product or the qkv layer, and the
activation quantizers of x, q, k, v, ``W_qk x`` and the softmax).

A rule is ``"REGEX=SPEC"`` (``SPEC`` is ``float``, ``w4a4``, ``w2a2:lsq``,
``w8a4:statsq``; the method applies to the weights) or a ``(regex, QuantSpec |
dict)`` pair. The first rule whose regex *fully* matches the path wins. User
rules come before the defaults, which reproduce the reference: the family's edge layers
(patch embedding, heads) W8A8 with LSQ weights, its block layers at the configured bits
and weight method.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

from ofq_jax.errors import UserError
from ofq_jax.quant import integer
from ofq_jax.quant.shapes import check_bits

WEIGHT_METHODS = ("statsq", "lsq")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How one layer is quantized; ``None`` bits keep that side in float."""
  weight_bits: int | None = None
  act_bits: int | None = None
  weight_method: str = "statsq"
  # Batch size in every LSQ activation step's gradient scale 1/sqrt(Qp*M) (spec 7.6);
  # None: the batch the quantizer sees. Set for every rule from quant.lsq_grad_batch.
  grad_batch: int | None = None
  # How quantized matmuls run (ofq_jax.quant.integer): 'fake' float fake-quant, or
  # 'integer' levels with exact accumulation; the operand dtype and backward precision.
  matmul: str = "fake"
  matmul_operands: str = "auto"
  matmul_backward: str = "float32"
  # The float (and fake-quant) matmuls' precision: the model's ``precision``.
  precision: str = "highest"
  # QKR's attention (``quant.qk_bias``, ``quant.qk_form``); every other layer ignores them.
  qk_bias: str = "drop"
  qk_form: str = "factors"

  def __post_init__(self):
    if self.weight_bits is not None:
      check_bits(self.weight_bits, what="weight")
    if self.act_bits is not None:
      check_bits(self.act_bits, what="activation")
    if self.weight_method not in WEIGHT_METHODS:
      raise UserError(f"Unknown weight_method {self.weight_method!r}; use one of "
                       f"{WEIGHT_METHODS}.")

  @property
  def quantize_weights(self) -> bool:
    return self.weight_bits is not None

  @property
  def quantize_acts(self) -> bool:
    return self.act_bits is not None


FLOAT = QuantSpec()

_SPEC_RE = re.compile(r"^w(\d+)a(\d+)(?::(statsq|lsq))?$")


def parse_spec(text: str) -> QuantSpec:
  """``float`` | ``w{b}a{b}`` | ``w{b}a{b}:{statsq|lsq}`` -> QuantSpec."""
  text = text.strip().lower()
  if text == "float":
    return FLOAT
  match = _SPEC_RE.match(text)
  if not match:
    raise UserError(f"Cannot parse quantization spec {text!r}: write 'float', 'w4a4' or "
                     "'w2a2:lsq' (weight bits, activation bits, optional weight method).")
  weight_bits, act_bits, method = match.groups()
  return QuantSpec(int(weight_bits), int(act_bits), method or "statsq")


def parse_rule(rule: Any) -> tuple[re.Pattern[str], QuantSpec]:
  """A rule string ``"REGEX=SPEC"`` or a ``(regex, QuantSpec | dict | str)`` pair."""
  if isinstance(rule, str):
    if "=" not in rule:
      raise UserError(f"Quantization rule {rule!r} has no '='; write 'REGEX=SPEC', e.g. "
                       r"'blocks\.0\..*=float' or 'head=w8a8:lsq'.")
    pattern, spec = rule.rsplit("=", 1)
    spec = parse_spec(spec)
  else:
    pattern, spec = rule
    if isinstance(spec, str):
      spec = parse_spec(spec)
    elif isinstance(spec, dict):
      spec = QuantSpec(**spec)
    elif not isinstance(spec, QuantSpec):
      raise TypeError(f"Rule {rule!r}: spec must be a QuantSpec, dict or string.")
  try:
    return re.compile(pattern), spec
  except re.error as e:
    raise UserError(f"Quantization rule {rule!r}: bad regex {pattern!r} ({e}).") from None


def default_rules(weight_bits: int, act_bits: int, weight_method: str, edge_layers: str,
                  block_layers: str) -> list[tuple[re.Pattern[str], QuantSpec]]:
  """The reference's assignment (spec 3.1): W8A8 LSQ edges, b-bit blocks; the family
  names both (``Family.edge_layers``, ``Family.block_layers``)."""
  return [
      (re.compile(edge_layers), QuantSpec(8, 8, "lsq")),
      (re.compile(block_layers), QuantSpec(weight_bits, act_bits, weight_method)),
  ]


class QuantRules:
  """Resolves a module path to its QuantSpec (first full match wins; else ``fallback``,
  float).

  The first ``num_user`` rules are the user's; ``check_all_matched`` reports those
  whose regex matched none of the paths asked for (a typo would otherwise be ignored).
  """

  def __init__(self, rules: Iterable[tuple[re.Pattern[str], QuantSpec]], num_user: int = 0,
               fallback: QuantSpec = FLOAT):
    self.rules = list(rules)
    self.num_user = num_user
    self.fallback = fallback
    self.paths: list[str] = []

  def __call__(self, path: str) -> QuantSpec:
    self.paths.append(path)
    for pattern, spec in self.rules:
      if pattern.fullmatch(path):
        return spec
    return self.fallback

  @classmethod
  def from_config(cls, quant: Any, family: Any, precision: str = "highest") -> "QuantRules":
    """Rules of a model config's ``quant`` block (all-float when not enabled) for a model
    of ``family`` (``models.family.Family``), every spec carrying the settings of the
    whole model: its ``precision``, the matmul keys, QKR's form. A layer reads them from
    its spec alone."""
    if not quant.enabled:
      return cls([], fallback=QuantSpec(precision=precision))
    user: Sequence[Any] = tuple(quant.get("rules", ()) or ())
    rules = [parse_rule(r) for r in user] + default_rules(
        quant.weight_bits, quant.act_bits, quant.weight_method, family.edge_layers,
        family.block_layers)
    shared = dict(grad_batch=quant.get("lsq_grad_batch"),
                  matmul=integer.resolve("matmul", quant.get("matmul", "fake")),
                  matmul_operands=quant.get("matmul_operands", "auto"),
                  matmul_backward=integer.resolve("matmul_backward",
                                                  quant.get("matmul_backward", "float32")),
                  precision=precision, qk_bias=quant.get("qk_bias", "drop"),
                  qk_form=quant.get("qk_form", "factors"))
    return cls([(pattern, dataclasses.replace(spec, **shared))
                for pattern, spec in rules], num_user=len(user),
               fallback=dataclasses.replace(FLOAT, **shared))

  def check_all_matched(self) -> None:
    """Raises one line per user rule that matched no layer path, with the paths."""
    unmatched = [pattern.pattern for pattern, _ in self.rules[:self.num_user]
                 if not any(pattern.fullmatch(p) for p in self.paths)]
    if unmatched:
      raise UserError(
          f"error: quant.rules {unmatched} match no layer of this model; fix the regex "
          f"(it must fully match a path such as {', '.join(sorted(set(self.paths))[:6])}, "
          "...).")
