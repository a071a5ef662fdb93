"""How arrays are placed on devices and how the steps are compiled: a mesh or pmap.

Two interchangeable strategies, chosen by `config.parallelism`:

* `MeshParallel` (`"jit"`): `jax.jit` over a one-axis mesh of every device of every process;
  batches are global arrays sharded on the batch axis, the train state is replicated, and XLA
  inserts the reductions (the losses reduce their statistics over the whole batch by
  themselves). Evaluation and prediction run per device under `shard_map`.
* `PmapParallel` (`"pmap"`): `jax.pmap` over the local devices with the axis `PMAP_AXIS`; the
  state is replicated per device and the losses reduce over that axis.

Both expose the same methods, so the trainer never asks which one it has. Both take the devices
to compile for (default: JAX's own): `--mode=compile` passes a target's compile-only devices
(`tce_jax.targets`) and lowers the same steps for abstract inputs (`abstract_inputs`).
"""

import jax
import numpy as np
from flax import jax_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PMAP_AXIS = "batch"
MESH_AXIS = "data"


class MeshParallel:
    """`jax.jit` over a one-axis mesh of all devices: batch sharded, state replicated."""

    axis_name = None
    eval_axis_name = MESH_AXIS  # evaluation runs per device (shard_map)

    def __init__(self, devices=None):
        devices = jax.devices() if devices is None else devices
        self.mesh = Mesh(np.asarray(devices), (MESH_AXIS,))
        self.replicated = NamedSharding(self.mesh, P())
        self.sharded = NamedSharding(self.mesh, P(MESH_AXIS))

    def compile_init(self, init_fn):
        return jax.jit(init_fn, out_shardings=self.replicated)

    def compile_train(self, step_fn):
        return jax.jit(
            step_fn,
            in_shardings=(self.replicated, self.sharded),
            out_shardings=(self.replicated, self.replicated),
            donate_argnums=0,
        )

    def compile_eval(self, step_fn):
        # Evaluation has no cross-device operation but the final psum (over `eval_axis_name`):
        # under shard_map each device keeps its loops (sliding windows, per-example resizing
        # to the label resolution) on its own examples, as under pmap.
        per_device = jax.shard_map(
            step_fn, mesh=self.mesh, in_specs=(P(), P(MESH_AXIS)), out_specs=P(), check_vma=False
        )
        return jax.jit(
            per_device, in_shardings=(self.replicated, self.sharded), out_shardings=self.replicated
        )

    def compile_predict(self, step_fn):
        # Per device, as evaluation runs; the predictions stay sharded over devices like the
        # batch.
        per_device = jax.shard_map(
            step_fn,
            mesh=self.mesh,
            in_specs=(P(), P(MESH_AXIS)),
            out_specs=P(MESH_AXIS),
            check_vma=False,
        )
        return jax.jit(
            per_device, in_shardings=(self.replicated, self.sharded), out_shardings=self.sharded
        )

    def put_batch(self, batch):
        return jax.tree.map(
            lambda x: jax.make_array_from_process_local_data(self.sharded, x), batch
        )

    @staticmethod
    def local_rows(predictions) -> np.ndarray:
        """This process's rows of sharded per-example outputs, in its batch order."""
        shards = sorted(predictions.addressable_shards, key=lambda s: s.index[0].start or 0)
        return np.concatenate([np.asarray(s.data) for s in shards])

    def host_state(self, state):
        return state  # global arrays: Orbax saves them as they are.

    def device_state(self, state):
        return state

    def abstract_state(self, abstract):
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.replicated), abstract
        )

    def abstract_inputs(self, abstract_state, batch):
        """`(state, batch)` as the compiled steps take them, from the state's shapes and the
        global batch's (`jax.ShapeDtypeStruct`s): for lowering without data or devices."""
        return self.abstract_state(abstract_state), jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self.sharded), batch
        )

    @staticmethod
    def fetch(tree):
        return jax.device_get(tree)

    @staticmethod
    def current_step(state) -> int:
        return int(jax.device_get(state.step))


class PmapParallel:
    """`jax.pmap(axis_name="batch")` over the local devices: state replicated per device."""

    axis_name = PMAP_AXIS
    eval_axis_name = PMAP_AXIS

    def __init__(self, devices=None):
        self.devices = devices  # None: this process's devices
        self.num_local = jax.local_device_count() if devices is None else len(devices)

    def compile_init(self, init_fn):
        return jax.jit(init_fn)

    def compile_train(self, step_fn):
        return jax.pmap(step_fn, axis_name=PMAP_AXIS, donate_argnums=0, devices=self.devices)

    def compile_eval(self, step_fn):
        return jax.pmap(step_fn, axis_name=PMAP_AXIS, devices=self.devices)

    compile_predict = compile_eval

    def put_batch(self, batch):
        return jax.tree.map(lambda x: x.reshape(self.num_local, -1, *x.shape[1:]), batch)

    @staticmethod
    def local_rows(predictions) -> np.ndarray:
        """This process's rows of per-device outputs, in its batch order."""
        x = np.asarray(jax.device_get(predictions))
        return x.reshape(-1, *x.shape[2:])

    def host_state(self, state):
        # Orbax refuses the host-local arrays of `unreplicate` in multi-process runs.
        return jax.device_get(jax_utils.unreplicate(state))

    def device_state(self, state):
        return jax_utils.replicate(state, axis_name=PMAP_AXIS)

    def abstract_state(self, abstract):
        return jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), abstract)

    def abstract_inputs(self, abstract_state, batch):
        """`(state, batch)` as the compiled steps take them (see `MeshParallel`): the state
        replicated and the batch split over a leading device axis."""
        n = self.num_local
        return (
            jax.tree.map(lambda x: jax.ShapeDtypeStruct((n, *x.shape), x.dtype), abstract_state),
            jax.tree.map(
                lambda x: jax.ShapeDtypeStruct((n, x.shape[0] // n, *x.shape[1:]), x.dtype), batch
            ),
        )

    @staticmethod
    def fetch(tree):
        return jax.device_get(jax.tree.map(lambda x: x[0], tree))

    @staticmethod
    def current_step(state) -> int:
        return int(jax.device_get(state.step[0]))


def create_parallel(config, devices=None):
    """The parallelism of `config.parallelism` over `devices` (default: JAX's)."""
    kind = PmapParallel if config.parallelism == "pmap" else MeshParallel
    return kind(devices)
