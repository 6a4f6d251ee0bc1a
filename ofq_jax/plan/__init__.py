"""Plans for TPU pods made on a CPU host: each stage's real train step, compiled for a
topology's compile-only devices (libtpu, no TPU), with what it needs and does.

  python -m ofq_jax.plan --config=configs/imagenet.py:model=small,bits=2 --topology=v5e:4x4

``plan(config, topology)`` (Colab) returns a ``Plan``; ``report.as_text`` /
``report.as_dict`` print it. Modules: ``chips`` (peak rates and HBM, with sources),
``topology`` (names -> devices), ``planner`` (build, trace, compile), ``census`` (dots by
kind), ``program`` (XLA's memory, cost and collectives), ``estimate`` (the roofline).
"""

from ofq_jax.plan.planner import Plan, StageReport, plan

__all__ = ["Plan", "StageReport", "plan"]
