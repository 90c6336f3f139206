"""A forward pass over a (data=2, fsdp=2, tensor=2) mesh of 8 CPU devices matches one device."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from fst_jax.models.configs import tiny
from fst_jax.models.transformer import positions_from_mask
from fst_jax.sharding import MeshConfig, batch_sharding, make_mesh, shard_state
from torch_reference import hf_model, jax_twin


def test_sharded_forward_matches_single_device():
    assert jax.device_count() == 8
    cfg = tiny("qwen2")  # biases and an untied head: every parameter kind gets sharded
    model = jax_twin(cfg, hf_model(cfg))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 24)), jnp.int32)
    mask = jnp.asarray(np.arange(24)[None, :] >= np.array([[0], [3], [0], [9]]))
    positions = positions_from_mask(mask)
    ref = np.asarray(model(tokens, positions, mask))

    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    graphdef, state = nnx.split(model)
    state = shard_state(state, mesh)
    assert state["layers"]["wq"][...].sharding.spec == P(None, "fsdp", "tensor", None)
    assert state["embed"][...].sharding.spec == P("tensor", "fsdp")
    batch = [jax.device_put(x, batch_sharding(mesh, 2)) for x in (tokens, positions, mask)]

    @jax.jit
    def forward(state, tokens, positions, mask):
        return nnx.merge(graphdef, state)(tokens, positions, mask)

    out = forward(state, *batch)
    assert len(out.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5)
