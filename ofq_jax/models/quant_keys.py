"""Every ``model.quant.*`` key, declared once (``config_keys.Key``): the shared
defaults (``quant_defaults``), their checks, the keys that do not change a stored model
(``config.STORAGE_BLIND_KEYS``) and docs/models.md's table derive from ``QUANT_KEYS``."""

from __future__ import annotations

import ml_collections

from ofq_jax import config_keys
from ofq_jax.config_keys import Key
from ofq_jax.quant import integer
from ofq_jax.quant.rules import WEIGHT_METHODS

ATTENTIONS = ("qkr", "standard")
ATTN_INITS = ("random", "pretrained")
QK_BIASES = ("drop", "fold")
QK_FORMS = ("factors", "product")

_BITS = dict(kind=int, low=2, high=8)

QUANT_KEYS: tuple[Key, ...] = (
    Key("enabled", "float model (exactly timm's / torchvision's parameters) or quantized",
        default=False, kind=bool, stored=False),
    Key("weight_bits", "bits of every block layer's weights (the paper: 2, 3, 4; quant.rules "
        "can keep a layer float)", default=2, **_BITS),
    Key("act_bits", "bits of every block layer's input activations", default=2, **_BITS),
    Key("weight_method", "'statsq' (OFQ) or 'lsq' (the LSQ baseline: DeiT with "
        "attention='standard' only)", default="statsq", choices=WEIGHT_METHODS),
    Key("attention", "'qkr' quantizes each head's W_q^T W_k (the released recipe); "
        "'standard' quantizes W_q and W_k", default="qkr", choices=ATTENTIONS),
    Key("lsq_grad_batch", "the batch in every LSQ gradient scale 1/sqrt(Qp*M); unset: the "
        "batch the quantizer sees (the reference used its per-GPU batch)", default=None,
        kind=int, low=1, stored=False),
    Key("attn_proj_init", "reference quirk: attn.proj starts from torch's default init when "
        "quantizing; 'pretrained' copies it", default="random", choices=ATTN_INITS,
        stored=False),
    Key("attn_qkv_init", "the same quirk for qkv of standard attention", default="random",
        choices=ATTN_INITS, stored=False),
    Key("qk_bias", "QKR drops b_q, b_k ('drop', the reference); 'fold' keeps the pretrained "
        "attention exactly through a per-head key bias W_k^T b_q", default="drop",
        choices=QK_BIASES),
    Key("qk_form", "how QKR holds W_qk: 'factors' (parameters W_q, W_k, the reference) or "
        "'product' (one parameter per head: CGA with cga.include_qk=True)",
        default="factors", choices=QK_FORMS, stored=False),
    Key("matmul", "'fake' (the reference's float32 fake-quant), 'integer' (matmuls on the "
        "integer levels) or 'auto' (integer on TPUs, fake elsewhere)", default="auto",
        choices=integer.MATMULS, stored=False),
    Key("matmul_operands", "the integer path's operand dtype ('auto': per platform)",
        default="auto", choices=integer.OPERANDS, stored=False),
    Key("matmul_backward", "the quantized matmuls' backward precision ('auto': bf16 on TPUs, "
        "float32 elsewhere)", default="auto", choices=integer.BACKWARDS, stored=False),
    Key("rules", "extra per-layer rules (regex=spec) before the defaults, e.g. "
        "('head=w8a8:lsq',); see ofq_jax.quant.rules", default=()),
    Key("position_table_init", "reference quirk: quantizing re-draws every relative-position "
        "table; 'pretrained' copies them", default="random", choices=ATTN_INITS,
        stored=False, families=("swin",)),
)


def quant_defaults(family: str = "deit") -> ml_collections.ConfigDict:
  """The ``quant`` block of a ``family``'s model config, every key at its default."""
  quant = ml_collections.ConfigDict()
  for key in QUANT_KEYS:
    if key.families and family not in key.families:
      continue
    quant[key.name] = (ml_collections.config_dict.placeholder(key.kind) if key.default is None
                       else key.default)
  return quant


def check_quant(quant: ml_collections.ConfigDict, family: str) -> None:
  """Every ``quant`` value its declaration accepts (``UserError`` naming the first that is
  not)."""
  config_keys.check(quant, QUANT_KEYS, prefix="model.quant.", family=family)


STORAGE_BLIND_QUANT_KEYS = tuple(f"quant.{k.name}" for k in QUANT_KEYS if not k.stored)
"""``quant.*`` keys that say how a stored model runs or was trained or initialised, not
what its tensors mean."""
