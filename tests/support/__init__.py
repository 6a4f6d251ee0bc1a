"""Helpers the tests share (imported as ``support.*``; ``tests/`` is on the path)."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parents[2]
"""The repository root."""
