"""Shared, expensive inputs of the integration tests."""

import pytest

from ofq_jax import train
from support.runs import digits_config


@pytest.fixture(scope="session")
def float_teacher(tmp_path_factory) -> str:
  """An ofq_jax float model directory (1 float step) to start QAT runs from."""
  workdir = tmp_path_factory.mktemp("teacher")
  train.train_and_evaluate(digits_config(stages=("float",), num_train_steps=1), str(workdir))
  return str(workdir / "models" / "float")


@pytest.fixture(scope="module")
def docs_tmp(tmp_path_factory):
  """The folder that stands for ``/tmp/`` in the doc blocks one test file runs."""
  return tmp_path_factory.mktemp("docs_tmp")
