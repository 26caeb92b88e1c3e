"""Subprocess worker: decode on a (1, 2, 2) mesh of 4 fake CPU devices and on one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/infer/mesh_decode_worker.py RUN_DIR
"""

import json, sys
import jax
from alpaca_jax import sharding
from alpaca_jax.config import MeshConfig
from alpaca_jax.infer import SamplingConfig, generate, load_model
mesh = sharding.make_mesh(MeshConfig(data=1, fsdp=2, tensor=2))
sharded = load_model(sys.argv[1], mesh=mesh)
single = load_model(sys.argv[1])
prompts = ["The sum of 1", "Add 3 and 4. Café", "東京"]
s = SamplingConfig(max_new_tokens=10)
wq = jax.tree_util.tree_leaves(sharded.params["layers_0"]["attention"]["wq"])[0]
print(json.dumps({"sharded": [c.token_ids for c in generate(sharded, prompts, s)],
                  "single": [c.token_ids for c in generate(single, prompts, s)],
                  "wq_devices": len(wq.sharding.device_set), "wq_shard": list(wq.addressable_shards[0].data.shape)}))
