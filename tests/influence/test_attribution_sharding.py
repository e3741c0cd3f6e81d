"""Every attribution estimator on 4 (forced host) CPU devices equals its single-device result:
batches (scoring, covariances, projections, DataInf sums) are padded and sharded as the
engine's scores are (tests/influence/test_influence_sharding.py)."""

import numpy as np

from tests.support import run_on_forced_devices

SCRIPT = r"""
import json
import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
from jaxrec.config import ExactOptions
from jaxrec.influence import attribution as at
from jaxrec.influence.datainf import DataInfOptions
from jaxrec.influence.kfac import EKFACOptions, KFACOptions
from jaxrec.influence.tracin import TracInOptions
from jaxrec.influence.trak import TRAKOptions

class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="d2")(jnp.tanh(nn.Dense(4, name="d1")(x)))

model = MLP()
rng = np.random.default_rng(0)
def make(m):
    return {"x": rng.normal(size=(m, 2, 3)).astype(np.float32),
            "y": rng.normal(size=(m, 2, 2)).astype(np.float32)}
train, query = make(43), make(5)
params = model.init(jax.random.PRNGKey(0), train["x"][:1])["params"]
def output(p, b):
    return model.apply({"params": p}, b["x"]).reshape(b["x"].shape[0], -1)
def psl(p, b):
    return 0.5 * jnp.sum((output(p, b) - b["y"].reshape(b["y"].shape[0], -1)) ** 2, -1)
def loss(p, b):
    return jnp.mean(psl(p, b))
small = dict(batch_size=10, query_batch_size=3)
estimators = {
    "influence": at.InfluenceOptions(ExactOptions(), damping=0.05, **small),
    "grad-cos": at.GradCosOptions(norm_batch_size=10, **small),
    "kfac": KFACOptions(fit_batch_size=10, **small),
    "ekfac": EKFACOptions(fisher="gauss-newton", fit_batch_size=10, **small),
    "ekfac-sampled": EKFACOptions(fisher="sampled", fit_batch_size=10, **small),
    "trak": TRAKOptions(dim=8, damping=0.01, **small),
    "datainf": DataInfOptions(grad_batch_size=10, **small),
    "tracin": TracInOptions(**small),
}
out = {"devices": jax.device_count()}
checkpoints = at.Checkpoints([params, jax.tree.map(lambda x: 0.9 * x, params)], [0.1, 0.2])
for name, opts in estimators.items():
    p = checkpoints if name == "tracin" else params
    state = at.fit(opts, loss, psl, p, train, output=output)
    out[name] = at.attribute(state, train, query).tolist()
print(json.dumps(out))
"""


def run(devices: int) -> dict:
    return run_on_forced_devices(SCRIPT, devices)


def test_four_devices_equal_one():
    one, four = run(1), run(4)
    assert one["devices"] == 1 and four["devices"] == 4
    for name in one:
        if name == "devices":
            continue
        a, b = np.asarray(four[name]), np.asarray(one[name])
        assert a.shape == (43, 5), name
        scale = np.abs(b).max()
        assert scale > 1e-3, name
        np.testing.assert_allclose(a, b, atol=2e-4 * scale, rtol=0, err_msg=name)
