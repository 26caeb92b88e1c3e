"""Grouped-query self-attention with rotary embeddings, causal within each packed segment.

Exact implementations of the same function (`ModelConfig.attention`):
- "xla": `jax.nn.dot_product_attention` with a [B, 1, T, S] boolean segment-causal mask.
- "chunked": queries split into static blocks, each attending only to its key prefix (the keys
  after a block can never be attended to under a causal mask). Same result, about half the
  score FLOPs and memory at long lengths, no [B, 1, T, T] mask broadcast; the faster choice on
  CPU. It is plain jnp, so it also runs (and differentiates) everywhere.
- "pallas_flash" (GPU) and "splash" (TPU): fused Pallas kernels that take segment ids, and
  "cudnn" (NVIDIA GPU, bf16/fp16): cuDNN's fused kernel with the packing as a per-row mask
  (`alpaca_jax.model.fused_attention`). On a mesh each runs per device under `shard_map`.
- "auto" (the default): the fastest of these that is exact for packed rows on the platform
  the step runs on (the order the benchmark measured, `kernel_table.json`, else
  `DEFAULT_ORDER`) and that the mesh can split, chosen (and logged, with the reason) by
  `select_attention`.

Decoding uses a third path: the layer writes the new tokens' keys and values into its
`KVCache` (slot s holding position s of its row; `write_cache`), then attends over the whole
cache with a causal mask on positions (`cached_attention`). Writing before reading lets XLA
update the (donated) cache buffer in place: read-then-write made it copy every layer's cache on
every step. The projections and rotary embeddings are the same code as in training.

Einsum legend: B batch, T length (queries), S length (keys), D embed, N query heads,
K kv heads, G query heads per kv head (N = K * G), H head dim, R rows of a query block
(its queries times G).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from pathlib import Path

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from alpaca_jax.config import LoraConfig
from alpaca_jax.model.fused_attention import KERNELS, MeshLayout, on_mesh
from alpaca_jax.model.layers import param
from alpaca_jax.model.lora import adapted_dense
from alpaca_jax.model.rope import apply_rope

log = logging.getLogger("alpaca_jax")

ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "chunked", "pallas_flash", "splash", "cudnn")
QUERY_CHUNK = 128  # queries per block of the chunked attention (a multiple of the SIMD width)
FUSED_KERNELS = {"pallas_flash": "gpu", "splash": "tpu", "cudnn": "gpu"}  # fused kernel -> its platform
INTERPRETABLE = ("pallas_flash", "splash")  # kernels Pallas can interpret off their platform (tests)
# What `auto` tries first per platform when the kernel table has not measured it: the Pallas
# kernel measured faster than xla (BENCHMARKS.md), then cuDNN (unmeasured with a packing mask).
DEFAULT_ORDER = {"gpu": ("pallas_flash", "cudnn"), "tpu": ("splash",)}
# Written by the GPU/TPU benchmark (benchmarks/gpu.py): per platform, the exact kernels fastest
# first. Read once per process.
KERNEL_TABLE = Path(__file__).with_name("kernel_table.json")
_logged: set[str] = set()  # selection messages already logged (attention is traced once per layer)


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    implementation: str  # what runs: xla | chunked | pallas_flash | splash | cudnn
    interpret: bool      # a Pallas kernel run by the Pallas interpreter (off its platform: tests)
    reason: str          # why, in words (logged)
    sharded: bool = False  # a fused kernel run per device under shard_map (a mesh of > 1 device)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    """What the choice depends on besides the platform: one layer's attention call."""
    head_dim: int
    num_heads: int = 1
    num_kv_heads: int = 1
    batch: int = 1
    dtype: str = "float32"


@dataclasses.dataclass(frozen=True)
class MeshSplit:
    """The mesh as the choice sees it (no devices): the size of every mesh axis, and the axes
    that split the batch, heads, kv heads and length (`MeshLayout` without the mesh)."""
    axis_sizes: tuple[tuple[str, int], ...] = ()
    batch: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    kv_heads: tuple[str, ...] = ()
    length: tuple[str, ...] = ()

    @property
    def devices(self) -> int:
        out = 1
        for _, size in self.axis_sizes:
            out *= size
        return out

    def size(self, axes: tuple[str, ...]) -> int:
        sizes = dict(self.axis_sizes)
        out = 1
        for axis in axes:
            out *= sizes[axis]
        return out

    @classmethod
    def of(cls, layout: MeshLayout) -> "MeshSplit":
        return cls(tuple(dict(layout.mesh.shape).items()), layout.batch, layout.heads, layout.kv_heads,
                   layout.length)


def _unsupported(kernel: str, shape: AttentionShape) -> str | None:
    """Why `kernel` cannot take this shape, or None. (Lengths never stop them: rows are padded.)"""
    head_dim = shape.head_dim
    if kernel == "pallas_flash" and not 16 <= head_dim <= 256:
        return f"the Triton flash kernel needs 16 <= head_dim <= 256, got {head_dim}"
    if kernel == "splash" and head_dim % 128:
        return f"splash attention needs head_dim a multiple of 128 (TPU lanes), got {head_dim}"
    if kernel == "cudnn":
        if shape.dtype not in ("bfloat16", "float16"):
            return f"cuDNN attention needs bf16/fp16 compute, got {shape.dtype}"
        if head_dim % 8 or head_dim > 256:
            return f"cuDNN attention needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    return None


def _axes(axes: tuple[str, ...]) -> str:
    return "mesh axis " + "x".join(repr(a) for a in axes)


def _unsplittable(shape: AttentionShape, devices: int, split: MeshSplit | None) -> str | None:
    """Why a kernel cannot run per device on this mesh, or None (one device needs no split)."""
    if devices <= 1:
        return None
    if split is None or split.devices != devices:
        return (f"no mesh layout was given for the {devices} devices (XLA would gather a kernel "
                f"call's q/k/v onto every device)")
    if split.length:
        return (f"the length (or head dim) is split over {_axes(split.length)}; the kernels need whole "
                f"sequences and heads")
    if split.heads != split.kv_heads:
        return (f"heads are split over {_axes(split.heads) if split.heads else 'no mesh axis'} but kv "
                f"heads over {_axes(split.kv_heads) if split.kv_heads else 'no mesh axis'} (GQA groups "
                f"must stay on one device)")
    for what, count, axes in (("rows", shape.batch, split.batch), ("heads", shape.num_heads, split.heads),
                              ("kv heads", shape.num_kv_heads, split.kv_heads)):
        if count % split.size(axes):
            return f"{count} {what} do not divide over {_axes(axes)} (size {split.size(axes)})"
    return None


def _decide(requested: str, platform: str, shape: AttentionShape, devices: int = 1,
            split: MeshSplit | None = None, order: tuple[str, ...] | None = None
            ) -> tuple[AttentionChoice, bool]:
    """(choice, whether it is a fallback from what was asked). Pure: everything it depends on
    is an argument. `order`: this platform's exact fused kernels, fastest first (the kernel
    table's, else DEFAULT_ORDER's)."""
    fallback = "chunked" if platform == "cpu" else "xla"  # the faster exact jnp path there
    sharded = devices > 1
    on_mesh_words = f" per device under shard_map on {devices} devices" if sharded else ""
    if requested in ("xla", "chunked"):
        return AttentionChoice(requested, False, "requested"), False
    if requested == "auto":
        candidates = DEFAULT_ORDER.get(platform, ()) if order is None else order
        if not candidates:
            why = ("the kernel table measured no exact fused kernel faster than xla here" if order is not None
                   else "no fused kernel that takes segment ids runs here")
            return AttentionChoice(fallback, False, f"auto on {platform}: {why}, so {fallback!r}"), \
                platform != "cpu" and order is None
        problems = []
        for kernel in candidates:
            problem = _unsupported(kernel, shape) or _unsplittable(shape, devices, split)
            if problem is None:
                source = "the kernel table's fastest" if order is not None else "the default"
                return AttentionChoice(kernel, False, f"auto on {platform}: fused {kernel!r} kernel "
                                       f"({source} exact kernel for packed rows){on_mesh_words}",
                                       sharded), False
            problems.append(f"{kernel}: {problem}")
        return AttentionChoice(fallback, False, f"auto on {platform}: {'; '.join(problems)}; "
                               f"falling back to {fallback!r}"), True
    if requested not in FUSED_KERNELS:
        raise ValueError(f"unknown attention implementation {requested!r}")
    home = FUSED_KERNELS[requested]
    problem = _unsupported(requested, shape)
    if problem is None and platform != home and not (platform == "cpu" and requested in INTERPRETABLE):
        problem = f"it is a {home} kernel and this is {platform}"
    problem = problem or _unsplittable(shape, devices, split)
    if problem:
        return AttentionChoice(fallback, False, f"model.attention={requested} on {platform}: {problem}; "
                               f"falling back to {fallback!r}"), True
    if platform != home:
        return AttentionChoice(requested, True, f"{requested} on cpu runs in Pallas interpret mode "
                               f"(exact but slow: for tests){on_mesh_words}", sharded), True
    return AttentionChoice(requested, False, f"requested{on_mesh_words}", sharded), False


def kernel_order(platform: str) -> tuple[str, ...] | None:
    """This platform's exact fused kernels, fastest first, from the benchmark's kernel table;
    None when the table has not measured this platform (then `auto` uses DEFAULT_ORDER)."""
    return _table_order(KERNEL_TABLE, platform)


@functools.cache
def _table_order(table: Path, platform: str) -> tuple[str, ...] | None:
    if not table.is_file():
        return None
    entry = json.loads(table.read_text()).get(platform)
    if not entry:
        return None
    return tuple(k for k in entry["fastest_exact"] if FUSED_KERNELS.get(k) == platform)


def select_attention(requested: str, platform: str, shape: AttentionShape | int, devices: int = 1,
                     split: MeshSplit | None = None) -> AttentionChoice:
    """The implementation `model.attention=requested` runs on `platform` ("cpu", "gpu", "tpu")
    for `shape` (or just a head dim) with `devices` devices in the computation, laid out as
    `split` says.

    Logs the choice and why, once per distinct outcome; a fallback from what was asked is a
    warning (never silent).
    """
    shape = AttentionShape(head_dim=shape) if isinstance(shape, int) else shape
    choice, fell_back = _decide(requested, platform, shape, devices, split, kernel_order(platform))
    message = f"attention: {choice.implementation} ({choice.reason})"
    if requested != choice.implementation or choice.interpret or fell_back:
        if message not in _logged:
            _logged.add(message)
            log.log(logging.WARNING if fell_back else logging.INFO, message)
    return choice


def segment_causal_mask(segment_ids: jax.Array) -> jax.Array:
    """[B, T] segment ids -> [B, 1, T, S] bool: attend to earlier-or-same tokens of one segment.

    Padding has segment 0 and so attends only to other padding; every query sees at least
    itself, so no softmax row is empty (which would give NaNs).
    """
    length = segment_ids.shape[-1]
    causal = jnp.tril(jnp.ones((length, length), dtype=jnp.bool_))
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same_segment & causal)[:, None, :, :]


def chunked_causal_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                             segment_ids: jax.Array, chunk: int = QUERY_CHUNK) -> jax.Array:
    """Segment-causal attention, query block by query block: [B, T, N, H] x [B, S, K, H] x2 -> [B, T, N, H].

    Block [start, end) of queries only needs keys [0, end): later keys are in its future. Each
    block is an ordinary masked softmax over that prefix (scores and softmax in fp32, as
    `jax.nn.dot_product_attention`), so the result equals full attention with the mask from
    `segment_causal_mask`, with the upper-right key blocks never computed.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[2]
    groups = num_heads // num_kv_heads
    scale = head_dim ** -0.5
    # Kv heads before length, and each block's (query, group) pairs flattened into one row
    # axis R, so every matmul here, and each of its gradients, contracts a single dim: a plain
    # batched [R, H] x [H, S] (XLA:CPU is slower on dots that contract two dims at once).
    query = (query * jnp.asarray(scale, query.dtype)).reshape(batch, length, num_kv_heads, groups, head_dim)
    query = jnp.transpose(query, (0, 2, 1, 3, 4))   # [B, K, T, G, H]
    key = jnp.transpose(key, (0, 2, 1, 3))          # [B, K, S, H]
    value = jnp.transpose(value, (0, 2, 1, 3))      # [B, K, S, H]
    position = jnp.arange(length)
    outputs = []
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        rows = query[:, :, start:end].reshape(batch, num_kv_heads, (end - start) * groups, head_dim)
        scores = jnp.einsum("BKRH,BKSH->BKRS", rows, key[:, :, :end],
                            preferred_element_type=jnp.float32)
        allowed = ((segment_ids[:, start:end, None] == segment_ids[:, None, :end])
                   & (position[start:end, None] >= position[None, :end]))  # [B, T, S]
        allowed = jnp.repeat(allowed, groups, axis=1)  # [B, R, S]: row t*G + g is query t
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
        out = jnp.einsum("BKRS,BKSH->BKRH", probs, value[:, :, :end])
        outputs.append(out.reshape(batch, num_kv_heads, end - start, groups, head_dim))
    out = jnp.concatenate(outputs, axis=2)           # [B, K, T, G, H]
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(batch, length, num_heads, head_dim)


def attend(query: jax.Array, key: jax.Array, value: jax.Array, segment_ids: jax.Array,
           implementation: str, layout: MeshLayout | None = None) -> jax.Array:
    """Segment-causal GQA attention by the named implementation: [B, T, N, H] out.

    The choice is made at trace time for the platform JAX runs on (`jax.default_backend()`);
    on more than one device a fused kernel runs per device under `shard_map` over `layout`.
    """
    shape = AttentionShape(query.shape[-1], query.shape[2], key.shape[2], query.shape[0], query.dtype.name)
    split = None if layout is None else MeshSplit.of(layout)
    devices = jax.device_count() if layout is None else split.devices
    choice = select_attention(implementation, jax.default_backend(), shape, devices, split)
    if choice.implementation == "chunked":
        return chunked_causal_attention(query, key, value, segment_ids, QUERY_CHUNK)
    if choice.implementation == "xla":
        # dot_product_attention accepts K < N when K divides N.
        return jax.nn.dot_product_attention(query, key, value, mask=segment_causal_mask(segment_ids))
    kernel = functools.partial(KERNELS[choice.implementation], interpret=choice.interpret)
    if choice.sharded:
        kernel = on_mesh(kernel, layout)
    return kernel(query, key, value, segment_ids)


@flax.struct.dataclass
class KVCache:
    """Keys and values for decoding: [B, K, S, H] each, one pair per layer; kv heads before
    slots, so the score and value matmuls read the cache as it lies (no per-step transpose of
    the whole cache). Slot s of a row holds that row's token at position s (rows never share
    slots), so rows of different lengths need no offsets: a prompt right-padded to the batch's
    longest is exact, its padding slots are overwritten by generated tokens before any query
    reaches them."""
    key: jax.Array
    value: jax.Array


def write_cache(cache: KVCache, key: jax.Array, value: jax.Array, positions: jax.Array) -> KVCache:
    """The cache with the new tokens' keys/values [B, T, K, H] stored at slots `positions` [B, T]."""
    rows = jnp.arange(positions.shape[0])[:, None]
    # Index arrays on dims 0 and 2 around a slice: numpy rules put their [B, T] dims first, so
    # the update is laid out [B, T, K, H], as the new keys are.
    def put(buffer, values):
        return buffer.at[rows, :, positions].set(values.astype(buffer.dtype))
    return KVCache(key=put(cache.key, key), value=put(cache.value, value))


def cached_attention(query: jax.Array, cache: KVCache, positions: jax.Array) -> jax.Array:
    """Attention of new tokens at `positions` [B, T] over a cache that already holds them -> [B, T, N, H].

    query [B, T, N, H]; cache [B, K, S, H]. A query at position p attends to slots 0..p of its
    row: its earlier tokens and itself. Later slots are stale or empty and masked; a padding
    query of a right-padded prompt attends to whatever its slots hold, and its output is never
    used. Scores and softmax in fp32, as in training.
    """
    batch, length, num_heads, head_dim = query.shape
    num_kv_heads = cache.key.shape[1]
    groups = num_heads // num_kv_heads
    query = (query * jnp.asarray(head_dim ** -0.5, query.dtype)).reshape(batch, length, num_kv_heads, groups, head_dim)
    keys, values = cache.key.astype(query.dtype), cache.value.astype(query.dtype)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", query, keys, preferred_element_type=jnp.float32)
    allowed = jnp.arange(keys.shape[2])[None, None, :] <= positions[:, :, None]   # [B, T, S]
    scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    # probs x values as a batched [R, S] x [S, H] product over (B, K), rows first (row g * T + t
    # is token t of group g). The einsum form let XLA put the cache first and pick a slower
    # batched kernel: the tiny model's batch-16 decode step took ~1.4x as long.
    rows = probs.reshape(batch, num_kv_heads, groups * length, probs.shape[-1])     # [B, K, R, S]
    out = jax.lax.dot_general(rows, values, (((3,), (2,)), ((0, 1), (0, 1))))     # [B, K, R, H]
    out = jnp.transpose(out.reshape(batch, num_kv_heads, groups, length, head_dim), (0, 3, 1, 2, 4))
    return out.reshape(batch, length, num_heads, head_dim)


class Attention(nn.Module):
    num_heads: int
    num_kv_heads: int
    head_dim: int
    init_std: float
    dtype: jnp.dtype
    param_dtype: jnp.dtype
    implementation: str = "auto"
    lora: LoraConfig | None = None  # adapters on some of q, k, v, o (model/lora.py)
    layout: MeshLayout | None = None  # the mesh a fused kernel runs on per device (None: one device)

    @nn.compact
    def __call__(self, x: jax.Array, segment_ids: jax.Array | None, cos: jax.Array, sin: jax.Array,
                 positions: jax.Array | None = None, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """[B, T, D] -> ([B, T, D], the updated cache or None). Training passes segment ids and
        no cache (and gets None back); decoding passes positions and this layer's cache, and
        gets it back with this call's keys and values written in."""
        embed = x.shape[-1]
        init = nn.initializers.normal(self.init_std)
        q_axes, kv_axes, o_axes = ("embed", "heads", "head_dim"), ("embed", "kv_heads", "head_dim"), ("heads", "head_dim", "embed")
        wq = param(self, "wq", init, (embed, self.num_heads, self.head_dim), q_axes, self.param_dtype)
        wk = param(self, "wk", init, (embed, self.num_kv_heads, self.head_dim), kv_axes, self.param_dtype)
        wv = param(self, "wv", init, (embed, self.num_kv_heads, self.head_dim), kv_axes, self.param_dtype)
        wo = param(self, "wo", init, (self.num_heads, self.head_dim, embed), o_axes, self.param_dtype)

        x = x.astype(self.dtype)
        linear = lambda target, h, w, num_in, axes: adapted_dense(self, target, h, w, num_in, axes, self.lora, self.dtype)
        query = linear("q", x, wq, 1, q_axes)   # [B, T, N, H]
        key = linear("k", x, wk, 1, kv_axes)    # [B, S, K, H]
        value = linear("v", x, wv, 1, kv_axes)
        query = apply_rope(query, cos, sin)
        key = apply_rope(key, cos, sin)
        if cache is None:
            out = attend(query, key, value, segment_ids, self.implementation, self.layout)  # [B, T, N, H]
        else:
            cache = write_cache(cache, key, value, positions)
            out = cached_attention(query, cache, positions)
        return linear("o", out, wo, 2, o_axes), cache  # [B, T, D]
