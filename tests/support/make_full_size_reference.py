#!/usr/bin/env python3
"""Writes a float parity reference for a port of a full-size torchvision Swin or timm DeiT.

    python tests/support/make_full_size_reference.py ARCH OUT.npz [--seed 0] [--batch 2] [--init random|default]

ARCH is one of swin_t, swin_s, swin_b (torchvision.models.<arch>(weights=None)) or
deit_base (timm.create_model("deit_base_patch16_224", pretrained=False)).

OUT.npz holds `state/<name>` (the model's state dict, numpy, original dtypes: float32
parameters plus, for Swin, the int64 `relative_position_index` buffers), `images`
(batch, 3, 224, 224) float32 NCHW (ImageNet-normalised random 8-bit pixels) and `logits`
(batch, 1000) float32, the eval-mode output of the model on `images` (CPU, float32,
torch.no_grad()). np.savez, uncompressed.

With --init random (default) every conv/linear weight is redrawn N(0, 1/fan_in), every bias
N(0, 0.05^2), LayerNorm affines 1 + N(0, 0.05^2) / N(0, 0.05^2) and the relative-position
tables N(0, 0.5^2) (Swin); for DeiT, `cls_token` and `pos_embed` are then redrawn
N(0, 0.02^2) from the same generator so that they are not zero. --init default keeps the
library's own init. Generalises make_swin_tv_reference.py (same format, same `randomise`,
same image recipe; for swin_t with the same seed the output is identical). Run it where
torch, torchvision and timm load (../shared/reference/README.md): never in this
project's environment, which cannot hold torchvision beside its CPU torch.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])

ARCHS = ("swin_t", "swin_s", "swin_b", "deit_base")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("arch", choices=ARCHS)
  p.add_argument("out", help="output .npz path")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--init", choices=("random", "default", "torchvision"), default="random",
                 help="'torchvision' is an alias of 'default' (the library's own init)")
  p.add_argument("--batch", type=int, default=2)
  return p.parse_args(argv)


def randomise(model, rng, torch) -> None:
  nn = torch.nn
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Linear, nn.Conv2d)):
        w = module.weight
        w.copy_(torch.from_numpy(rng.standard_normal(w.shape) / math.sqrt(w[0].numel())))
        if module.bias is not None:
          module.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.05, module.bias.shape)))
      elif isinstance(module, nn.LayerNorm):
        module.weight.copy_(torch.from_numpy(1.0 + rng.normal(0.0, 0.05, module.weight.shape)))
        module.bias.copy_(torch.from_numpy(rng.normal(0.0, 0.05, module.bias.shape)))
    for name, p in model.named_parameters():
      if name.endswith("relative_position_bias_table"):
        p.copy_(torch.from_numpy(rng.normal(0.0, 0.5, p.shape)))


def randomise_tokens(model, rng, torch) -> None:
  """DeiT/ViT: redraw cls_token and pos_embed N(0, 0.02^2) (after randomise)."""
  with torch.no_grad():
    for name in ("cls_token", "pos_embed"):
      p = getattr(model, name)
      p.copy_(torch.from_numpy(rng.normal(0.0, 0.02, p.shape)))


def build(arch, torch):
  if arch == "deit_base":
    import timm  # pylint: disable=import-outside-toplevel
    return timm.create_model("deit_base_patch16_224", pretrained=False)
  import torchvision  # pylint: disable=import-outside-toplevel
  return getattr(torchvision.models, arch)(weights=None)


def main(argv=None):
  a = parse_args(argv)
  t0 = time.time()
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
  torch.manual_seed(a.seed)
  rng = np.random.default_rng(a.seed)
  model = build(a.arch, torch).eval()
  if a.init == "random":
    randomise(model, rng, torch)
    if a.arch == "deit_base":
      randomise_tokens(model, rng, torch)
  pixels = rng.integers(0, 256, size=(a.batch, 3, 224, 224))
  images = ((pixels / 255.0 - IMAGENET_MEAN[None, :, None, None])
            / IMAGENET_STD[None, :, None, None]).astype(np.float32)
  with torch.no_grad():
    logits = model(torch.from_numpy(images)).numpy()
  arrays = {f"state/{k}": v.detach().cpu().numpy() for k, v in model.state_dict().items()}
  arrays.update(images=images, logits=logits.astype(np.float32))
  os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
  np.savez(a.out, **arrays)
  lib = f"torchvision {torchvision.__version__}"
  if a.arch == "deit_base":
    import timm  # pylint: disable=import-outside-toplevel
    lib += f", timm {timm.__version__}"
  init = "default" if a.init == "torchvision" else a.init
  print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.1f} MB, {len(arrays) - 2} state "
        f"tensors) in {time.time() - t0:.1f} s: arch {a.arch}, torch {torch.__version__}, "
        f"{lib}, init {init}, seed {a.seed}, "
        f"logits range [{logits.min():.3f}, {logits.max():.3f}]")


if __name__ == "__main__":
  main()
