"""``python -m ofq_jax.plan`` as a user runs it: ``--json`` prints the plan, ``--help`` the
flags, and a bad topology or batch is one ``error:`` line (exit status 2)."""

import json
import subprocess
import sys

from support import REPO

TINY = ["--config.model.embed_dim=32", "--config.model.depth=1", "--config.model.num_heads=2",
        "--config.model.patch_size=8", "--config.model.img_size=16",
        "--config.data.image_size=16"]
COMMAND = [sys.executable, "-m", "ofq_jax.plan", f"--config={REPO / 'configs' / 'digits.py'}",
           "--topology=v5e:2x2", "--stages=qat"] + TINY


def run(*extra: str) -> subprocess.CompletedProcess:
  return subprocess.run(COMMAND + list(extra), capture_output=True, text=True, cwd=REPO,
                        timeout=600, check=False)


def test_a_plan_as_json():
  """One run; the table's formatting of the same numbers is tested in-process
  (``tests/unit/plan``)."""
  result = run("--json")
  assert result.returncode == 0, result.stderr[-2000:]
  plan = json.loads(result.stdout)
  stage = plan["stages"][0]
  assert plan["topology"] == "v5e:2x2" and plan["devices"] == 4 and stage["stage"] == "qat"
  assert stage["memory"]["fits"] and stage["student_int8_share"] > 0
  assert stage["memory"]["total"] < stage["memory"]["capacity"] and stage["per_device_batch"] == 16
  assert "INVALID_ARGUMENT" not in result.stderr  # libtpu's pod probing is kept quiet


def test_mistakes_are_one_line():
  for extra, says in ((["--topology=v5e:3x3"], "libtpu refuses it"),
                      (["--per_chip_batch=0"], "--per_chip_batch=0 must be at least 1")):
    result = run(*extra)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and says in lines[-1], (
        extra, result.stderr[-2000:])
    assert len([line for line in lines if not line.startswith("[plan]")]) == 1, lines


def test_help_lists_the_flags():
  result = subprocess.run([sys.executable, "-m", "ofq_jax.plan", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120, check=False)
  assert result.returncode == 1 and not result.stderr  # absl's --help exit status
  for flag in ("--topology", "--per_chip_batch", "--fit", "--json", "--stages"):
    assert flag in result.stdout
