"""ofq_jax: OFQ (oscillation-free quantization of low-bit ViTs) in JAX / Flax NNX."""

from ofq_jax.compat import check_versions as _check_versions

_check_versions()
