r"""OFQ DeiT-T W2A2 on ImageNet-1k (spec 5.2 / 5.3); paper top-1: 64.33.

QAT (300 + 10 epochs), then CGA (30 epochs at lr 1e-5, BR 0.005) in the same workdir:

  python -m ofq_jax.main --config=configs/deit_t_w2a2.py --workdir=$WORKDIR \
      --config.qat.teacher=$DEIT/deit_tiny_distilled_patch16_224-b40b3cf7.pth \
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.manual_dir=$IMAGENET_TARS
  python -m ofq_jax.main --config=configs/deit_t_w2a2.py:stage=cga --workdir=$WORKDIR \
      --config.qat.teacher=$DEIT/deit_tiny_distilled_patch16_224-b40b3cf7.pth \
      --config.data.data_dir=$TFDS_DATA_DIR --config.data.manual_dir=$IMAGENET_TARS

Hyperparameters as the reference: 4 x 140 = 560 global batch, lr 5.47e-4, wd 0.05, 5 warmup epochs from 1e-6, no
mixup / cutmix, no repeated augmentation; KD from the float distilled DeiT;
LSQ gradient batch = the reference's per-GPU batch. Reference quirks are kept (see
ofq_jax/recipes.py for the flags that change them).
"""

from ofq_jax.recipes import imagenet_recipe


def get_config(arg: str = ""):
  return imagenet_recipe("tiny", 2, arg)
