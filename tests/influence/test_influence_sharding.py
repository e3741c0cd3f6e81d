"""Sharding over devices: sample scores and the mean gradient on 4 (forced host) CPU devices
equal the single-device results (issue 2, "Scale past one device")."""

import numpy as np

from tests.support import run_on_forced_devices

SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.flatten_util import ravel_pytree
from jaxrec import influence as inf
from jaxrec.influence.batching import data_mesh, padded_batches

def per_sample(p, b):
    h = jnp.tanh(b["x"] @ p["w1"] + p["b1"])
    return jnp.log1p((h @ p["w2"] - b["y"]) ** 2)

rng = np.random.default_rng(0)
data = {"x": rng.normal(size=(103, 6)).astype(np.float32),
        "y": rng.normal(size=103).astype(np.float32)}
params = {"w1": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
          "b1": jnp.asarray(rng.normal(size=8), jnp.float32),
          "w2": jnp.asarray(rng.normal(size=8), jnp.float32)}
u = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
mesh = data_mesh()
_, _, batch, _ = next(padded_batches(data, 10, mesh))
out = {"devices": jax.device_count(), "batch_devices": len(batch["x"].sharding.device_set),
       "batch_rows": int(batch["x"].shape[0]),
       "scores": inf.sample_scores(per_sample, params, data, u, batch_size=10).tolist(),
       "grad": np.asarray(ravel_pytree(inf.mean_gradient(per_sample, params, data,
                                                         batch_size=10))[0]).tolist()}
print(json.dumps(out))
"""


def run(devices: int) -> dict:
    return run_on_forced_devices(SCRIPT, devices)


def test_four_devices_equal_one():
    one, four = run(1), run(4)
    assert one["devices"] == 1 and four["devices"] == 4
    assert four["batch_devices"] == 4 and four["batch_rows"] == 12  # 10 rounded up to 4 x 3
    assert len(four["scores"]) == 103
    np.testing.assert_allclose(four["scores"], one["scores"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(four["grad"], one["grad"], atol=1e-5, rtol=0)
    assert np.abs(one["scores"]).max() > 0.1  # not trivially zero
