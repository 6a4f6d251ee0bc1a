"""All three stages of a family the package was not written for (``tests/support/hf_vit.py``),
registered by one line: the float stage, QAT from its ``from_float``, CGA with
``cga.include_qk`` (the product form under its own parameter names), the tracker's groups
and the plots' family (read back from ``run.json``) from its declaration, and the stage's
model directory read back."""

from ofq_jax import evaluate, models, plots, train
from support import hf_vit
from support.runs import digits_config, read_metrics


def test_hf_style_family_trains_through_all_stages(tmp_path, monkeypatch):
  monkeypatch.setitem(models.FAMILIES, hf_vit.ARCH, hf_vit.FAMILY)  # the registry line
  config = digits_config(**{"cga.include_qk": True, "num_train_steps": 2,
                            "tracking.fixed_grid": False})
  config.model = hf_vit.model_config(img_size=32, patch_size=8, depth=1,
                                     num_classes=config.model.num_classes)
  config.cga.targets = hf_vit.FAMILY.cga_targets
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert 0.9 < summary["frozen_fraction"] <= 1.0
  groups = {k.rsplit("/", 1)[-1] for k in summary["oscillation_qat"] if "/group/" in k}
  assert groups == {"qk", "qk_implied", "v", "proj", "fc1", "fc2", "patch_embed", "head"}
  records = read_metrics(tmp_path)
  frozen = {k for r in records if r["stage"] == "cga" for k in r if k.startswith("cga/frozen/")}
  assert {"cga/frozen/encoder.0.attention.qk_kernel", "cga/frozen/encoder.0.ffn.down.kernel",
          "cga/frozen/encoder.0.attention.v_proj"} <= frozen, sorted(frozen)
  family = plots._run_family(str(tmp_path))  # pylint: disable=protected-access
  assert family is hf_vit.FAMILY
  assert plots.block_prefixes(records, family) == ["scales/encoder.0."]
  model, kind = evaluate.load_for_eval(str(tmp_path / "models" / "cga"), config.model)
  assert kind == "ofq_jax quantized (W_qk form)" and isinstance(model, hf_vit.HFViT)
