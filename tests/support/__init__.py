"""Helpers the tests share (imported as ``support.*``; ``tests/`` is on the path)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
"""The repository root."""


def load_bench(name: str):
  """``bench/<name>.py`` as a module (``bench/`` is not a package; its scripts import each
  other by file name, so the folder goes on the path)."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  if str(REPO / "bench") not in sys.path:
    sys.path.insert(0, str(REPO / "bench"))
  spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module
