"""Subprocess worker: lm-eval log-likelihoods with the params on the run's training mesh (4 fake
CPU devices) and on one device.

    XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/eval/lm_eval_mesh_worker.py RUN_DIR
"""

import json
import sys

import jax
import numpy as np

from alpaca_jax.eval.lm_eval_backend import AlpacaJaxLM
from alpaca_jax.eval.runner import _training_mesh
from alpaca_jax.infer import load_model

mesh = _training_mesh(sys.argv[1])
sharded, single = AlpacaJaxLM(load_model(sys.argv[1], mesh=mesh)), AlpacaJaxLM(load_model(sys.argv[1]))
rng = np.random.default_rng(0)
contexts = [[1] + rng.integers(4, 500, n).tolist() for n in (3, 17, 40)]
requests = [(None, c, rng.integers(4, 500, k).tolist()) for c in contexts for k in (1, 2, 5)]
wq = jax.tree_util.tree_leaves(sharded.model.params["layers_0"]["attention"]["wq"])[0]
print(json.dumps({"sharded": sharded._loglikelihood_tokens(requests), "single": single._loglikelihood_tokens(requests),
                  "mesh": dict(mesh.shape), "wq_devices": len(wq.sharding.device_set)}))
