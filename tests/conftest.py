"""Suite-wide settings: strict rank promotion, float32, CPU-sized defaults."""

import jax

jax.config.update("jax_numpy_rank_promotion", "raise")
