"""Subprocess worker: decode on a (1, 2, 2) mesh of 4 fake CPU devices and on one device; and
the perplexity of reference answers (a forward pass without a KV cache: `attend`) on one device
with the fused Pallas kernel (interpreted) while 4 devices are visible, next to the default
attention's: which attention each call chose is logged ("attention: ...") and collected here.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/infer/mesh_decode_worker.py RUN_DIR
"""

import dataclasses, json, logging, sys
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
choices = []
handler = logging.Handler()
handler.emit = lambda record: choices.append(record.getMessage())
logging.getLogger("alpaca_jax").addHandler(handler)
logging.getLogger("alpaca_jax").setLevel(logging.INFO)
from alpaca_jax.eval.dataset import EvalItem
from alpaca_jax.eval.perplexity import reference_loss
items = [EvalItem("Add 3 and 4.", "", "7", None, "t"), EvalItem("Name a color.", "", "Blue, like the sky.", None, "t")]
from alpaca_jax.model import init_params
# The tiny run's heads are 8 wide, below the Triton kernel's 16: the same model with 16-wide
# heads (GQA 4:2), freshly initialised, unsharded on the default device.
wide = dataclasses.replace(single.config, head_dim=16)
plain = dataclasses.replace(single, config=wide, params=jax.jit(init_params, static_argnums=0)(wide, jax.random.key(0)))
plain_loss = reference_loss(plain, items)[0].loss
choices.clear()
fused = dataclasses.replace(plain, config=dataclasses.replace(wide, attention="pallas_flash"))
print(json.dumps({"plain_loss": plain_loss, "fused_loss": reference_loss(fused, items)[0].loss,
                  "fused_choices": [m for m in choices if m.startswith("attention:")],
                  "sharded": [c.token_ids for c in generate(sharded, prompts, s)],
                  "single": [c.token_ids for c in generate(single, prompts, s)],
                  "wq_devices": len(wq.sharding.device_set), "wq_shard": list(wq.addressable_shards[0].data.shape)}))
