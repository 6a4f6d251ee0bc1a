"""A config key declared once: its default, the values it accepts, whether it changes a
stored model or a run, and what it means. Defaults, checks and documented tables are
derived from the declarations (``models/quant_keys.py`` for ``model.quant.*``;
``TRAINING_KEYS`` below for the stage, optimizer and schedule keys), so a key is added
in one place."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import ml_collections

from ofq_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key.

  ``choices``: the values it accepts; else ``kind`` (``int``, ``float``, ``bool``) with
  ``low`` / ``high`` bounds (``open_low``: ``low`` itself excluded). ``stored``: whether it
  changes what a stored model's tensors mean (else a model directory or packed file is read
  whatever it says); ``run``: whether it changes a run's trajectory (else a rerun may
  change it, ``run_record``)."""
  name: str
  meaning: str
  default: Any = ...  # ...: set by the recipes (recipes.base() and its callers)
  choices: tuple = ()
  kind: type | None = None
  low: float | None = None
  high: float | None = None
  open_low: bool = False
  stored: bool = True
  run: bool = True
  families: tuple[str, ...] = ()  # empty: every model family

  def rule(self) -> str:
    """The accepted values in words (the tables' and the errors' text)."""
    if self.choices:
      return ", ".join(_show(c) for c in self.choices)
    kind = {int: "an integer", float: "a number", bool: "True or False"}.get(self.kind, "any")
    if self.low is not None and self.high is not None:
      return f"{kind} in {'(' if self.open_low else '['}{_show(self.low)}, {_show(self.high)}]"
    if self.low is not None:
      return f"{kind} {'>' if self.open_low else '>='} {_show(self.low)}"
    return kind

  def problem(self, value: Any) -> str | None:
    """Why ``value`` is refused (``"is not ..."``), or None."""
    if self.choices:
      known = value in self.choices and type(value) in {type(c) for c in self.choices}
      return None if known else f"is not one of {self.choices}"
    if value is None and self.default is None:
      return None
    if self.kind is bool:
      return None if isinstance(value, bool) else f"is not {self.rule()}"
    if self.kind in (int, float):
      number = isinstance(value, (int, float)) and not isinstance(value, bool)
      if (not number or (self.kind is int and not isinstance(value, int)) or math.isnan(value)
          or (self.low is not None and (value < self.low
                                        or (self.open_low and value == self.low)))
          or (self.high is not None and value > self.high)):
        return f"is not {self.rule()}"
    return None


def _show(value: Any) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def check(block: ml_collections.ConfigDict, keys: Sequence[Key], prefix: str,
          family: str = "") -> None:
  """Raises ``UserError`` for the first key of ``block`` whose value its declaration
  refuses, naming the key, the value, what it accepts and what it means. Keys the block
  does not have (configs written before the key existed) are not checked."""
  for key in keys:
    if (family and key.families and family not in key.families) or key.name not in block:
      continue
    why = key.problem(block[key.name])
    if why:
      raise UserError(f"{prefix}{key.name}={block[key.name]!r} {why} ({key.meaning}); "
                      f"fix: --config.{prefix}{key.name}=<{key.rule()}>.")


def markdown_table(keys: Sequence[Key], prefix: str = "") -> list[str]:
  """The documented table of ``keys`` (docs/models.md, checked by the docs test)."""
  lines = ["| key | default | accepts | changes a stored model | meaning |",
           "|---|---|---|---|---|"]
  for key in keys:
    name = f"`{prefix}{key.name}`" + (f" ({', '.join(key.families)})" if key.families else "")
    default = ("unset" if key.default is None else "the recipe's" if key.default is ...
               else f"`{_show(key.default)}`")
    accepts = f"`{key.rule()}`" if key.choices else key.rule()
    lines.append(f"| {name} | {default} | {accepts} | {'yes' if key.stored else 'no'} | "
                 f"{key.meaning} |")
  return lines


def _stage(stage: str) -> tuple[Key, ...]:
  return (
      Key(f"{stage}.epochs", f"epochs of the {stage} stage's cosine", kind=int, low=0),
      Key(f"{stage}.cooldown_epochs", "epochs at min_lr after the cosine", kind=int, low=0),
      Key(f"{stage}.lr", "the peak learning rate", kind=float, low=0),
      Key(f"{stage}.warmup_epochs", "epochs of linear warmup from warmup_lr", kind=int,
          low=0),
      Key(f"{stage}.warmup_lr", "the learning rate warmup starts from", kind=float, low=0),
      Key(f"{stage}.min_lr", "the cosine's end learning rate", kind=float, low=0),
      Key(f"{stage}.weight_decay", "AdamW's decoupled weight decay", kind=float, low=0),
  )


TRAINING_KEYS: tuple[Key, ...] = (
    *_stage("float"),
    *_stage("qat"),
    Key("cga.epochs", "epochs of the CGA stage at qat.min_lr", kind=int, low=0),
    Key("cga.boundary_range", "half-width, in quantization steps, of the band around "
        "each rounding threshold where weights stay trainable", kind=float, low=0, high=0.5,
        open_low=True),
    Key("optim.b1", "AdamW's first-moment decay", kind=float, low=0, high=1),
    Key("optim.b2", "AdamW's second-moment decay", kind=float, low=0, high=1),
    Key("optim.eps", "AdamW's epsilon", kind=float, low=0, open_low=True),
    Key("optim.grad_clip_norm", "global gradient-norm clip (0: off)", kind=float, low=0),
    Key("label_smoothing", "label smoothing of the hard targets", kind=float, low=0,
        high=1),
    Key("seed", "the run's seed (each stage adds its index)", kind=int),
    Key("num_train_steps", "> 0 replaces every stage's epochs", kind=int),
    Key("batch_size", "the global training batch", kind=int, low=1),
    Key("eval_batch_size", "the global eval batch", kind=int, low=1, run=False),
    Key("log_every_steps", "steps between metric lines", kind=int, low=1, run=False),
    Key("checkpoint_every_steps", "steps between checkpoints", kind=int, low=1, run=False),
    Key("eval_every_steps", "steps between evaluations (0: at the end of each stage only)",
        kind=int, low=0, run=False),
    Key("keep_checkpoints", "checkpoints kept per stage", kind=int, low=1, run=False),
    Key("stop_check_every_steps", "steps between the processes' stop agreement",
        kind=int, low=1, run=False),
)
"""The stage, optimizer and schedule keys every training config has, with their ranges;
their values are the recipes' (``recipes.base()`` and the recipe builders)."""


def check_training(config: ml_collections.ConfigDict) -> None:
  """Every ``TRAINING_KEYS`` value of a training config in range, before any work."""
  for key in TRAINING_KEYS:
    *parents, leaf = key.name.split(".")
    node = config
    for parent in parents:
      node = node.get(parent) if node is not None else None
    if node is not None:
      check(node, [dataclasses.replace(key, name=leaf)],
            prefix="".join(f"{p}." for p in parents))
