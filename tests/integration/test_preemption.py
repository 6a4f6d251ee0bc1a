"""Preemption and kills: SIGTERM saves and exits 143 at a step every process agrees on,
SIGKILL loses nothing saved, and every rerun resumes exactly."""

import os
import socket
import subprocess

import pytest

from ofq_jax import preemption, train
from support import REPO
from support.runs import cli, cli_args, digits_config, losses_by_step, read_metrics


def test_preemption_and_kill_resume_exactly(tmp_path, float_teacher):
  """A QAT run of 6 steps gets SIGTERM after step 2 (seen at step 3: saves it, exits 143),
  is SIGKILLed after step 4, then finishes: its losses equal an uninterrupted run's."""
  overrides = {"num_train_steps": 6, "stages": "('qat',)", "qat.teacher": float_teacher,
               "tracking.every_steps": 2, "qat.warmup_epochs": 0}
  workdir = tmp_path / "interrupted"
  term = cli(workdir, overrides=overrides, check=False, env={preemption.FAULT_ENV: "qat:2:term"})
  assert term.returncode == 143, term.stderr[-2000:]
  assert "SIGTERM: saved checkpoint 3" in term.stdout
  killed = cli(workdir, overrides=overrides, check=False, env={preemption.FAULT_ENV: "qat:4"})
  assert killed.returncode == -9, killed.stderr[-2000:]
  assert "resumed from checkpoint 3" in killed.stdout
  finished = cli(workdir, overrides=overrides)
  assert "resumed from checkpoint 4" in finished.stdout
  config = digits_config(stages=("qat",), num_train_steps=6)
  config.qat.teacher = float_teacher
  config.tracking.every_steps = 2
  config.qat.warmup_epochs = 0
  train.train_and_evaluate(config, str(tmp_path / "straight"))
  straight = losses_by_step(tmp_path / "straight", "qat")
  records = [r for r in read_metrics(workdir, "qat") if "train/loss" in r]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  for record in records:
    assert record["train/loss"] == pytest.approx(straight[record["step"]], abs=1e-6)
  # The oscillation history survives the checkpoints: flips at the tracked steps 4 and
  # 6 compare with levels stored before the interruptions.
  straight_records = {r["step"]: r for r in read_metrics(tmp_path / "straight", "qat")
                      if "train/loss" in r}
  for record in records:
    for key in ("osc/flips", "osc/oscillating_fraction"):
      assert record[key] == pytest.approx(straight_records[record["step"]][key], abs=1e-9)
  assert records[3]["osc/flips"] > 0 and records[2]["osc/flips"] == records[1]["osc/flips"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, overrides, envs=({}, {})) -> list[tuple[int, str, str]]:
  """Two localhost processes (2 fake CPU devices each, gloo collectives); each reads its
  half of every global batch. Returns ``(exit status, stdout, stderr)`` per process."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", **envs[pid])
    args = cli_args(workdir, overrides, f"--coordinator_address=127.0.0.1:{port}",
                    "--num_processes=2", f"--process_id={pid}", "--cpu_collectives=gloo")
    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True, env=env, cwd=REPO))
  outputs = [p.communicate(timeout=600) for p in procs]
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def test_two_processes_stop_together_and_match_one(tmp_path):
  """SIGTERM reaches process 1 alone, after step 2. Both processes agree at step 3, save
  that step (the only checkpoint: the periodic ones are off) and exit 143; process 0,
  which got no signal, reports it. Rerun, both resume from step 3 and finish; every loss
  equals a single-process run's on the same global batch."""
  overrides = {"stages": "('float',)", "num_train_steps": 5, "checkpoint_every_steps": 100,
               "stop_check_every_steps": 1}
  workdir = tmp_path / "multi"
  stopped = _run_two_processes(workdir, overrides, envs=({}, {preemption.FAULT_ENV: "float:2:term"}))
  for status, out, err in stopped:
    assert status == 143, out + err[-3000:]
  assert "SIGTERM: saved checkpoint 3" in stopped[0][1]
  assert sorted(p.name for p in (workdir / "checkpoints" / "float").iterdir()) == ["3"]
  finished = _run_two_processes(workdir, overrides)
  for status, out, err in finished:
    assert status == 0, out + err[-3000:]
  assert "resumed from checkpoint 3" in finished[0][1]
  config = digits_config(stages=("float",), num_train_steps=5)
  config.mesh.data = 4
  train.train_and_evaluate(config, str(tmp_path / "single"))
  multi = losses_by_step(workdir, "float")
  single = losses_by_step(tmp_path / "single", "float")
  assert multi.keys() == single.keys() == {1, 2, 3, 4, 5}
  for step in single:
    assert multi[step] == pytest.approx(single[step], abs=1e-5)
  evals = [r for r in read_metrics(workdir) if "eval/top1" in r]
  single_eval = [r for r in read_metrics(tmp_path / "single") if "eval/top1" in r]
  assert evals[-1]["eval/top1"] == pytest.approx(single_eval[-1]["eval/top1"])
