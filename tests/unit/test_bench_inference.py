"""bench/inference.py end to end on a small image size: the rows, ratios and file sizes it
records in BENCHMARKS.md come out of one run with the meaning its docstring gives them."""

from __future__ import annotations

from support import load_bench


def test_one_run_times_three_variants_side_by_side(capsys):
  inference = load_bench("inference")
  rows = inference.main(["--models", "tiny", "--bits", "2", "--batch", "2", "--img-size", "32",
                         "--steps", "3", "--host-malloc", "default", "--json"])
  assert '"variant": "packed integer"' in capsys.readouterr().out
  by_variant = {row["variant"]: row for row in rows}
  assert set(by_variant) == {"float", "fake-quant", "packed integer"}
  fake, packed, float_ = (by_variant[k] for k in ("fake-quant", "packed integer", "float"))
  # Each variant against itself is 1 in every round; the ratios are seconds over seconds.
  assert fake["vs_fake"] == 1.0 and float_["vs_float"] == 1.0
  assert all(0 < row["vs_fake"] < 100 and 0 < row["vs_float"] < 100 for row in rows)
  assert all(row["host_malloc"] == "default" and row["img_size"] == 32 for row in rows)
  # 2-bit codes (4 per byte) and float norms / embeddings beside 4-byte float32 weights.
  assert fake["file_mb"] is None
  assert packed["file_mb"] < float_["file_mb"] / 5
