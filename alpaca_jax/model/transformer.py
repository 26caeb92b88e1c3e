"""The LLaMA decoder: embeddings, a stack of pre-norm blocks, final norm, output head.

Used pure-functionally through Linen: `Llama(cfg).apply({"params": params}, ids, positions,
segment_ids)`. Packed rows are handled by explicit `positions` (restarting at 0 per example)
and `segment_ids` (0 = padding), so attention never crosses examples. Decoding calls the same
module with one `KVCache` per layer instead of segment ids, and gets the caches back with the
new tokens' keys and values written in (see `attention.cached_attention`); the parameters are
the same. Decoding runs fastest with unscanned layers (`params.unscan_layers`): each layer then
reads its own weights and cache where they lie, while a scan slices (copies) them every step.

Einsum legend: B batch, T length, D embed, V vocab.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from alpaca_jax.config import LoraConfig, ModelConfig
from alpaca_jax.model.attention import Attention, KVCache
from alpaca_jax.model.fused_attention import MeshLayout
from alpaca_jax.model.layers import DTYPES, RMSNorm, dense, param
from alpaca_jax.model.lora import COLLECTION as LORA_COLLECTION
from alpaca_jax.model.mlp import SwiGLU
from alpaca_jax.model.rope import rope_cos_sin, rope_inverse_frequencies

# What a rematerialised block keeps for the backward pass ("none" means no remat at all).
REMAT_POLICIES = {
    "full": None,  # keep only the block's inputs; recompute everything
    "save_dots": jax.checkpoint_policies.dots_saveable,  # keep every matmul output
    # keep weight matmuls but not the attention score matmuls (which have batch dims)
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nn.Module):
    """x + attn(norm(x)), then x + mlp(norm(x)). Returns (x, this layer's updated cache or
    None) so it can be scanned (caches stack over layers)."""
    config: ModelConfig
    lora: LoraConfig | None = None
    layout: MeshLayout | None = None

    @nn.compact
    def __call__(self, x, segment_ids, cos, sin, positions=None, cache=None):
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        attn_in = RMSNorm(cfg.rms_norm_eps, param_dtype, name="attention_norm")(x)
        attn_out, cache = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.resolved_head_dim, cfg.init_std,
                                     dtype, param_dtype, cfg.attention, self.lora, self.layout, name="attention")(
                                         attn_in, segment_ids, cos, sin, positions, cache)
        x = x + attn_out
        mlp_in = RMSNorm(cfg.rms_norm_eps, param_dtype, name="mlp_norm")(x)
        x = x + SwiGLU(cfg.intermediate_size, cfg.init_std, dtype, param_dtype, self.lora, name="mlp")(mlp_in)
        return x, cache


def _block_class(cfg: ModelConfig):
    if cfg.remat == "none":
        return Block
    # prevent_cse is only needed outside scan (scan already stops XLA from merging recomputes).
    return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
    config: ModelConfig
    lora: LoraConfig | None = None  # LoRA adapters (a "lora" collection beside "params"); None = none
    layout: MeshLayout | None = None  # the training mesh, for fused attention per device (attention.py)

    @nn.compact
    def __call__(self, input_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array | None,
                 cache: tuple[KVCache, ...] | None = None, logits_at: jax.Array | None = None,
                 return_hidden: bool = False):
        """[B, T] int ids, positions and segment ids -> [B, T, V] logits (compute dtype).

        Decoding: pass `cache` (one `KVCache` per layer: [B, K, S, H] keys and values, slot =
        position; segment_ids is then unused) and get (logits, the caches with the new tokens
        written at their positions); `logits_at` [B] picks one position per row to compute the
        output head at ([B, 1, V] logits), since only each row's last token is sampled from.

        Training with `return_hidden=True` returns instead the final-norm hidden states
        [B, T, D] and the output head [V, D] (tied or not, in the compute dtype), whose product
        the logits are: the memory-lean loss (`alpaca_jax.train.loss`) multiplies them chunk by
        chunk so the [B, T, V] logits never exist at once.
        """
        cfg = self.config
        dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        init = nn.initializers.normal(cfg.init_std)
        embedding = param(self, "embedding", init, (cfg.vocab_size, cfg.hidden_size),
                          ("vocab", "embed"), param_dtype)
        x = jnp.take(embedding, input_ids, axis=0).astype(dtype)  # [B, T, D]

        inv_freq = rope_inverse_frequencies(cfg.resolved_head_dim, cfg.rope_theta, cfg.rope_scaling)
        cos, sin = rope_cos_sin(positions, inv_freq)

        block = _block_class(cfg)
        # Training passes (x, segment_ids, cos, sin); decoding adds positions and the layer's
        # cache.
        args = (segment_ids, cos, sin) if cache is None else (segment_ids, cos, sin, positions)
        if cfg.scan_layers:
            in_axes = (nn.broadcast,) * 3 if cache is None else (nn.broadcast,) * 4 + (0,)
            stack = nn.scan(block, variable_axes={"params": 0, LORA_COLLECTION: 0},
                            split_rngs={"params": True, "dropout": True},
                            in_axes=in_axes, length=cfg.num_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            if cache is None:
                x, _ = stack(cfg, self.lora, self.layout, name="layers")(x, *args)
            else:
                # Correct but slow: the scan takes the caches stacked (a copy each call), and
                # slices every layer's weights out of the stack. Decoding unscans instead.
                stacked = jax.tree.map(lambda *c: jnp.stack(c), *cache)
                x, stacked = stack(cfg, self.lora, self.layout, name="layers")(x, *args, stacked)
                cache = tuple(jax.tree.map(lambda c: c[i], stacked) for i in range(cfg.num_layers))
        else:
            updated = []
            for i in range(cfg.num_layers):
                layer_args = args if cache is None else (*args, cache[i])
                x, layer_cache = block(cfg, self.lora, self.layout, name=f"layers_{i}")(x, *layer_args)
                updated.append(layer_cache)
            cache = None if cache is None else tuple(updated)
        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)  # [B, 1, D]

        x = RMSNorm(cfg.rms_norm_eps, param_dtype, name="final_norm")(x)
        if cfg.tie_embeddings:
            head = embedding
        else:
            # [V, D] like the embedding (and HF's lm_head.weight): XLA:CPU runs this head's
            # backward ~10% faster than with a [D, V] weight (BENCHMARKS.md, layer matmuls).
            head = param(self, "lm_head", init, (cfg.vocab_size, cfg.hidden_size),
                         ("vocab", "embed"), param_dtype)
        if return_hidden:
            return x, head.astype(dtype)
        logits = dense(x, head.astype(dtype).T)  # [B, T, V]
        return logits if cache is None else (logits, cache)
