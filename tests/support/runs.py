"""Tiny digits training runs for the integration tests: configs, the CLI, metrics."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from support import REPO

TINY_OVERRIDES = {
    "model.embed_dim": 64, "model.depth": 2, "model.num_heads": 2, "model.patch_size": 8,
    "model.img_size": 32, "data.image_size": 32, "batch_size": 16, "eval_batch_size": 120,
    "num_train_steps": 3, "log_every_steps": 1, "checkpoint_every_steps": 1,
    "tensorboard": False, "plots": False,
}
"""A 2-block DeiT on 32 px digits, 3 steps per stage, logging and saving every step."""


SWIN_TINY_OVERRIDES = {
    "model.embed_dim": 16, "model.depths": (2, 1), "model.num_heads": (1, 2),
    "batch_size": 16, "eval_batch_size": 120, "num_train_steps": 3, "log_every_steps": 1,
    "checkpoint_every_steps": 1, "tensorboard": False, "plots": True,
}
"""``configs/digits.py:arch=swin`` shrunk: 16 channels, 2 + 1 blocks, 3 steps per stage."""


def set_fields(config, values: dict):
  """Assigns ``{"a.b.c": value}`` into a nested ConfigDict; returns it."""
  for key, value in values.items():
    node = config
    *parents, leaf = key.split(".")
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def load_config_file(name: str):
  """The module ``configs/<name>.py``, loaded as the CLI loads it."""
  spec = importlib.util.spec_from_file_location(f"{name}_config", REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def digits_config(arg: str = "", **overrides):
  """``configs/digits.py:arg`` with ``TINY_OVERRIDES`` and ``overrides`` (dotted keys)."""
  return set_fields(load_config_file("digits").get_config(arg), {**TINY_OVERRIDES, **overrides})


def imagenet_config(model: str, bits: int, stage: str = "qat"):
  """``configs/imagenet.py:model=...,bits=...,stage=...`` as it is."""
  return load_config_file("imagenet").get_config(f"model={model},bits={bits},stage={stage}")


def read_metrics(workdir, stage=None) -> list[dict]:
  lines = pathlib.Path(workdir, "metrics.jsonl").read_text().splitlines()
  records = [json.loads(line) for line in lines]
  return [r for r in records if stage is None or r["stage"] == stage]


def losses_by_step(workdir, stage) -> dict[int, float]:
  return {r["step"]: r["train/loss"] for r in read_metrics(workdir, stage) if "train/loss" in r}


def cli_args(workdir, overrides=None, *extra, config_arg: str = "") -> list[str]:
  """``python -m ofq_jax.main`` on the tiny digits config (``:config_arg``) with
  ``overrides``."""
  args = [sys.executable, "-m", "ofq_jax.main",
          f"--config={REPO / 'configs' / 'digits.py'}{config_arg}", f"--workdir={workdir}"]
  args += [f"--config.{k}={v}" for k, v in {**TINY_OVERRIDES, **(overrides or {})}.items()]
  return args + list(extra)


def cli(workdir, *extra, env=None, overrides=None, check=True, config_arg: str = ""
        ) -> subprocess.CompletedProcess:
  result = subprocess.run(cli_args(workdir, overrides, *extra, config_arg=config_arg),
                          capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), cwd=REPO, timeout=600,
                          check=False)
  if check and result.returncode != 0:
    raise AssertionError(f"exit {result.returncode}\n{result.stdout}\n{result.stderr}")
  return result
