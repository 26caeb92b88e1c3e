"""The device mesh and logical-axis rules: where every parameter and batch dimension lives.

Model code names dimensions logically (embed, heads, mlp, ...). The config's `mesh.rules` map
each logical name to a mesh axis (data, fsdp, tensor), a list of them, or null (replicated),
MaxText-style. A logical name with no rule is an error, never a silent replication: a new
parameter axis must be placed on purpose.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from alpaca_jax.configlib import ConfigError
from alpaca_jax.model.attention import MeshSplit
from alpaca_jax.model.fused_attention import MeshLayout

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """Resolve -1 ('the rest') and check that the mesh covers the devices exactly."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(f"mesh: {dict(zip(MESH_AXES, sizes))} does not divide the "
                              f"{num_devices} devices ({num_devices} is not a multiple of {known})")
        sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ConfigError(f"mesh: data*fsdp*tensor = {math.prod(sizes)} "
                          f"({dict(zip(MESH_AXES, sizes))}) but there are {num_devices} devices")
    return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def _mesh_axes_for(name: str | None, rules: dict[str, Any]):
    if name is None:
        return None
    if name not in rules:
        raise ConfigError(f"mesh.rules has no rule for logical axis '{name}' "
                          f"(add e.g. 'mesh.rules.{name}=null' to replicate it)")
    target = rules[name]
    if target is None:
        return None
    targets = (target,) if isinstance(target, str) else tuple(target)
    for t in targets:
        if t not in MESH_AXES:
            raise ConfigError(f"mesh.rules.{name}: unknown mesh axis '{t}' (mesh axes: {MESH_AXES})")
    return targets[0] if len(targets) == 1 else targets


def logical_to_mesh(spec: P, rules: dict[str, Any]) -> P:
    """PartitionSpec of logical names -> PartitionSpec of mesh axes; a mesh axis is used once."""
    used: set[str] = set()
    out = []
    for name in spec:
        axes = _mesh_axes_for(name, rules)
        flat = () if axes is None else ((axes,) if isinstance(axes, str) else axes)
        flat = tuple(a for a in flat if a not in used)  # an axis already used stays replicated
        used.update(flat)
        out.append(None if not flat else (flat[0] if len(flat) == 1 else flat))
    return P(*out)


def path_name(path) -> str:
    """('layers', 'attention', 'wq') key path -> 'layers/attention/wq'."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def check_divisible(path: str, shape: tuple[int, ...], spec: P, axis_sizes: dict[str, int]) -> None:
    for dim, (size, axes) in enumerate(zip(shape, spec)):
        if axes is None:
            continue
        names = (axes,) if isinstance(axes, str) else axes
        parts = math.prod(axis_sizes[a] for a in names)
        if size % parts:
            raise ConfigError(f"mesh: dimension {dim} of '{path}' (size {size}) is not divisible "
                              f"by mesh axes {names} (size {parts})")


def mesh_specs(logical_specs, shapes, axis_sizes: dict[str, int], rules: dict[str, Any]):
    """Mesh PartitionSpecs for a pytree from its logical specs, checked to divide evenly.

    Needs only the mesh's axis sizes, not devices, so the memory planner can use it for a
    cluster it is not running on.
    """
    def one(path, spec, shape):
        mesh_spec = logical_to_mesh(spec, rules)
        check_divisible(path_name(path), shape.shape, mesh_spec, axis_sizes)
        return mesh_spec
    return jax.tree_util.tree_map_with_path(one, logical_specs, shapes,
                                            is_leaf=lambda x: isinstance(x, P))


def shard_shape(shape: tuple[int, ...], spec: P, axis_sizes: dict[str, int]) -> tuple[int, ...]:
    """The per-device block of an array of `shape` placed with mesh `spec`."""
    out = list(shape)
    for dim, axes in enumerate(spec):
        if axes is not None:
            names = (axes,) if isinstance(axes, str) else axes
            out[dim] //= math.prod(axis_sizes[a] for a in names)
    return tuple(out)


def tree_shardings(logical_specs, shapes, mesh: Mesh, rules: dict[str, Any]):
    """NamedShardings for a pytree, given its logical specs and abstract shapes."""
    specs = mesh_specs(logical_specs, shapes, dict(mesh.shape), rules)
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: dict[str, Any], leading: int = 0) -> NamedSharding:
    """Sharding of a [..., batch, length] array with `leading` unsharded leading dims."""
    spec = logical_to_mesh(P("batch", "length"), rules)
    return NamedSharding(mesh, P(*([None] * leading), *spec))


def _flat(axes) -> tuple[str, ...]:
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def _attention_axes(rules: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    q = logical_to_mesh(P("batch", "length", "heads", "head_dim"), rules)
    kv = logical_to_mesh(P("batch", "length", "kv_heads", "head_dim"), rules)
    return dict(batch=_flat(q[0]), heads=_flat(q[2]), kv_heads=_flat(kv[2]), length=_flat(q[1]) + _flat(q[3]))


def attention_layout(mesh: Mesh, rules: dict[str, Any]) -> MeshLayout:
    """Where q [B, T, N, H] and k/v [B, S, K, H] live on `mesh` under `rules`: what a fused
    attention kernel is split over when it runs per device (`fused_attention.on_mesh`)."""
    return MeshLayout(mesh, **_attention_axes(rules))


def single_device_mesh() -> Mesh:
    """The default device as a mesh of size 1 on every axis: where an unsharded model runs."""
    return Mesh(np.asarray(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


def attention_split(axis_sizes: dict[str, int], rules: dict[str, Any]) -> MeshSplit:
    """`attention_layout` from the mesh's axis sizes alone (the planner has no devices)."""
    return MeshSplit(tuple(axis_sizes.items()), **_attention_axes(rules))


def check_batch_divides(batch_size: int, grad_accum: int, axis_sizes: dict[str, int],
                        rules: dict[str, Any]) -> int:
    """Rows per device per micro-batch; a config error naming both numbers when they do not divide."""
    names = _flat(logical_to_mesh(P("batch"), rules)[0])
    devices = math.prod(axis_sizes[a] for a in names)
    micro = batch_size // grad_accum
    if micro % devices:
        product = "*".join(f"mesh.{a}" for a in names)
        sizes = "*".join(str(axis_sizes[a]) for a in names)
        raise ConfigError(f"train.batch_size ({batch_size}) / train.grad_accum ({grad_accum}) = {micro} "
                          f"rows per micro-batch is not divisible by the {devices} data-parallel devices "
                          f"({product} = {sizes})")
    return micro // devices


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
