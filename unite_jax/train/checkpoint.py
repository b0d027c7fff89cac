"""Orbax checkpoints of a training run: train state, data-iterator positions, run metadata.

Layout: WORKDIR/checkpoints/<step>/{state, data, meta}. Orbax writes each step
into a temporary directory and renames it when every item is complete, so a run
killed at any moment (also during an async save) finds only complete steps;
`latest_step` ignores the rest and the run resumes from the newest complete one.

`data` holds the Grain iterator state of EVERY process (gathered to process 0,
which writes the JSON item), so a pod restarts each host exactly where it was.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from unite_jax import files


def gather_process_states(local_state: Any) -> dict[str, Any]:
    """{"process_<i>": state of process i} on every process (states are JSON-serialisable)."""
    if jax.process_count() == 1:
        return {"process_0": local_state}
    from jax.experimental import multihost_utils

    payload = np.frombuffer(json.dumps(local_state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([payload.size], np.int64))
    width = int(np.max(lengths))
    padded = np.zeros((width,), np.uint8)
    padded[:payload.size] = payload
    gathered = multihost_utils.process_allgather(padded)
    return {f"process_{i}": json.loads(bytes(gathered[i][:int(lengths[i][0])]).decode())
            for i in range(jax.process_count())}


class RunCheckpointer:
    """Saves and restores {state, data, meta} under `directory` (local path or gs://...)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                               create=True)
        # Orbax's array writer refuses relative paths; a URL (gs://...) is kept as given.
        self.manager = ocp.CheckpointManager(files.absolute(directory), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False) -> bool:
        """Starts a (possibly async) save; returns whether a save was started."""
        data = gather_process_states(data_state)
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data), meta=ocp.args.JsonSave(meta)),
            force=force)

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, Any, dict]:
        """(state placed as abstract_state's shardings say, this process's data state, meta)."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        data = restored["data"] or {}
        key = f"process_{jax.process_index()}"
        if key not in data:
            raise ValueError(f"checkpoint step {step} holds data-iterator states for {sorted(data)}, not for "
                             f"{key}: was it written by a run with a different number of processes?")
        return restored["state"], data[key], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
