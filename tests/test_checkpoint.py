"""RunCheckpointer on its own: what a training run saves comes back, wherever the workdir is given."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unite_jax.train.checkpoint import RunCheckpointer


@pytest.mark.parametrize("async_save", [True, False])
def test_relative_directory_saves_and_restores(tmp_path, monkeypatch, async_save):
    """`launch/train.py --workdir=run` is relative to the current directory; Orbax needs absolute paths."""
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(6, dtype=jnp.float32).reshape(2, 3), "step": jnp.asarray(7, jnp.int32)}
    data_state = {"next_index": 12, "pending": [3, 4]}
    checkpointer = RunCheckpointer(os.path.join("run", "checkpoints"), async_save=async_save)
    assert checkpointer.save(7, state, data_state, {"stage": "stage1"}, force=True)
    checkpointer.close()
    assert os.path.isdir(tmp_path / "run" / "checkpoints" / "7")

    monkeypatch.chdir(tmp_path / "run")  # the same directory, named from elsewhere
    reopened = RunCheckpointer("checkpoints", async_save=async_save)
    assert reopened.latest_step() == 7
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, restored_data, meta = reopened.restore(7, abstract)
    reopened.close()
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"]))
    assert int(restored["step"]) == 7 and restored_data == data_state and meta == {"stage": "stage1"}
