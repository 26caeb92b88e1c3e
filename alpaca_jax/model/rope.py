"""Rotary position embeddings in the Hugging Face (rotate-half) layout.

The rotary pairs are (i, i + H/2), not interleaved (2i, 2i+1), so HF LLaMA checkpoints convert
with renames and transposes only. Positions are explicit per token, which is what lets packed
sequences restart at position 0 for every example.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def rope_inverse_frequencies(head_dim: int, theta: float, scaling=None) -> np.ndarray:
    """inv_freq[i] = theta^(-2i/H), optionally with LLaMA-3.1 frequency-dependent scaling.

    `scaling` is a `RopeScalingConfig` (or None). The LLaMA-3 rule keeps high frequencies,
    divides low frequencies by `factor`, and interpolates smoothly in between, exactly as HF's
    `_compute_llama3_parameters`.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    inv_freq = inv_freq.astype(np.float32)  # HF computes these in fp32
    if scaling is None:
        return inv_freq
    old_len = scaling.original_max_position_embeddings
    low_wavelen = old_len / scaling.low_freq_factor
    high_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
    """cos and sin tables for integer positions [B, T] -> two [B, T, H] fp32 arrays."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)                          # [B, T, H]
    return jnp.cos(angles), jnp.sin(angles)


def _rotate_half(x: jax.Array) -> jax.Array:
    first, second = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-second, first], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B, T, heads, H] by the tables [B, T, H]; tables cast to x's dtype as HF does."""
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return x * cos + _rotate_half(x) * sin
