"""A calibrated one-block quantized DeiT on 16x16 images: the smallest state with every
part (params, LSQ buffers, a tracker, CGA targets) for tests of the train state."""

import jax.numpy as jnp
import numpy as np

from ofq_jax.models import calibrate, create_model, model_config


def tiny_quantized_deit():
  config = model_config(None, embed_dim=32, depth=1, num_heads=2, num_classes=10,
                        img_size=16, patch_size=8, quant=dict(enabled=True))
  model = create_model(config, 0)
  calibrate(model, jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 16, 3)),
                               jnp.float32))
  return model
