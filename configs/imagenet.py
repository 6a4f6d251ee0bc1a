r"""OFQ DeiT and Swin-T on ImageNet-1k, the paper's rows (spec 5.2, 5.3, 6): QAT 300 + 10 epochs with KD
from the float distilled DeiT, then CGA 30 epochs at lr 1e-5 (BR 0.005) in the same workdir.

  model  bits  top-1  batch    lr       wd    warmup  mixup/cutmix (ls)  rep. aug
  tiny   2     64.33  4 x 140  5.47e-4  0.05  5       off                -
  tiny   3     72.72  4 x 140  5.47e-4  0.05  5       off                -
  tiny   4     75.46  4 x 140  5.47e-4  0.05  5       off                -
  small  2     75.72  4 x 140  5.47e-4  0.05  5       off                -
  small  3     79.57  8 x 100  3.2e-4   0     0       0.8 / 1.0 (0.1)    x3
  small  4     81.10  8 x 100  3.2e-4   0     0       0.8 / 1.0 (0.1)    x3
  swin_t 2     78.52  8 x 64   5e-4     0.05  5       off                -
  swin_t 3     81.09  8 x 64   2e-4     0     0       0.8 / 1.0 (0.1)    -
  swin_t 4     81.88  8 x 64   2e-4     0     0       0.8 / 1.0 (0.1)    -

top-1: the paper's ImageNet val accuracy after CGA; batch: GPUs x per-GPU batch (the global
batch is their product; the per-GPU batch is also the LSQ gradient-scale batch, spec 7.6).
DeiT-S W4A4's released script is broken (spec 7.14): its row assumes the W3A3 flags.
Swin-T (torchvision's swin_t, KD from the same float model, one head: soft CE to the
teacher + hard CE; CGA on fc1 / fc2 / v / proj and the patch-merging reductions) uses
torchvision's IMAGENET1K_V1 file swin_t-704ceda3.pth as init and teacher.
Arguments: model=tiny|small|swin_t|base|swin_s|swin_b, bits=2|3|4, stage=qat|cga (default:
tiny, 2, qat). base (DeiT-B, deit_base_distilled_patch16_224-df68dfff.pth), swin_s and swin_b
(torchvision's swin_s-5e29d889.pth, swin_b-68c6b09e.pth) are not paper rows: they run
DeiT-S's and Swin-T's recipes at the same bits, untuned, with no paper number
(recipes.BEYOND_PAPER).

  python -m ofq_jax.main --config=configs/imagenet.py:model=tiny,bits=2 --workdir=$WORKDIR \
      --config.qat.teacher=$DEIT/deit_tiny_distilled_patch16_224-b40b3cf7.pth \
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.manual_dir=$IMAGENET_TARS
  python -m ofq_jax.main --config=configs/imagenet.py:model=tiny,bits=2,stage=cga --workdir=$WORKDIR \
      --config.qat.teacher=$DEIT/deit_tiny_distilled_patch16_224-b40b3cf7.pth \
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.manual_dir=$IMAGENET_TARS

DeiT-S uses deit_small_distilled_patch16_224-649709d9.pth. Reference quirks are kept
(ofq_jax/recipes.py names the flags that change them); the table is recipes.IMAGENET.
--config.cga.include_qk=True also anneals QKR's W_q^T W_k in the CGA stage, which the
reference never freezes (spec 4.4); the CGA model then holds W_qk itself.
"""

from ofq_jax import recipes
from ofq_jax.config_args import parse_arg


def get_config(arg: str = ""):
  return recipes.imagenet(**parse_arg(arg, where="configs/imagenet.py", model=tuple(recipes.MODELS),
                                      bits=(2, 3, 4), stage=("qat", "cga")))
