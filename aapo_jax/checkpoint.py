"""Orbax checkpoints of the full training state, data iterator position and config."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from aapo_jax.types import TrainState


def _key_data(rng):
    """A typed PRNG key's raw uint32 data, also for an abstract (ShapeDtypeStruct) key."""
    if isinstance(rng, jax.ShapeDtypeStruct):
        data = jax.eval_shape(jax.random.key_data, rng)
        return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=rng.sharding)
    return jax.random.key_data(rng)


def _to_saveable(state: TrainState) -> dict:
    """A plain pytree (typed PRNG keys as raw uint32 data; orbax stores arrays)."""
    tree = {
        "step": state.step,
        "params": state.params,
        "opt_state": state.opt_state,
        "rng": _key_data(state.rng),
        "skipped_updates": state.skipped_updates,
    }
    if state.ref_params is not None:
        tree["ref_params"] = state.ref_params
    return tree


def _abstract(tree):
    def one(x):
        sharding = getattr(x, "sharding", None)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)


def _stored_part(checkpointer: Checkpointer, target: TrainState) -> dict:
    """The saveable tree of `target` that a checkpoint of `checkpointer` holds (the
    reference params only when they are saved and `target` has them)."""
    if checkpointer.save_reference and target.ref_params is not None:
        return _to_saveable(target)
    return _to_saveable(target.replace(ref_params=None))


def _shapes(tree) -> dict[str, tuple[tuple[int, ...], str]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): (
            tuple(leaf.shape),
            str(jax.numpy.dtype(leaf.dtype)),
        )
        for path, leaf in leaves
    }


def describe_mismatch(checkpointer: Checkpointer, target: TrainState, step: int) -> str:
    """How a checkpoint's train state differs from `target`'s, in a line ('' if it does not).

    Names up to three leaves missing on either side or with another shape or dtype,
    e.g. `params/layers/mlp/up: (2, 128, 256) float32 saved, (4, 128, 256) float32 here`.
    """
    try:
        saved = checkpointer.saved_shapes(step)
    except Exception:  # no readable metadata: nothing to compare
        return ""
    wanted = _shapes(_stored_part(checkpointer, target))
    notes = {k: f"{k}: missing from the checkpoint" for k in set(wanted) - set(saved)}
    notes |= {k: f"{k}: in the checkpoint, not in this run" for k in set(saved) - set(wanted)}
    notes |= {
        k: f"{k}: {saved[k][0]} {saved[k][1]} saved, {wanted[k][0]} {wanted[k][1]} here"
        for k in set(saved) & set(wanted)
        if saved[k] != wanted[k]
    }
    if not notes:
        return ""
    # The weights first (they say which model), then the optimizer state.
    notes = [notes[k] for k in sorted(notes, key=lambda k: (not k.startswith("params/"), k))]
    more = f" (and {len(notes) - 3} more)" if len(notes) > 3 else ""
    return "; ".join(notes[:3]) + more


class Checkpointer:
    """Saves and restores `TrainState` + JSON side data under `directory`.

    Each checkpoint holds the params, optimizer state, step, rng and skipped-update
    count; the reference params only when `save_reference` (i.e. when they are not
    the initial weights, which the trainer reloads from the source checkpoint);
    and two JSON items: `data` (the data iterator state) and `meta` (config etc.).
    Saving is asynchronous; `wait()` blocks until the last save is on disk.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int = 2,
        save_reference: bool = False,
        async_save: bool = True,
    ):
        self.directory = Path(directory).absolute()
        self.save_reference = save_reference
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True
            ),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(
        self, step: int, state: TrainState, *, data: dict, meta: dict, force: bool = True
    ) -> bool:
        """Save at `step` (returns whether a checkpoint was written)."""
        if not self.save_reference:
            state = state.replace(ref_params=None)
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_saveable(state)),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
        )

    def restore(
        self, target: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict, dict[str, Any]]:
        """Restore into the structure and shardings of `target`.

        `target` is a live state or one of `jax.ShapeDtypeStruct` leaves that carry
        shardings; then nothing but the checkpoint is read, straight onto them.
        The reference params are taken from `target` when they were not saved.
        Returns (state, data, meta).
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        saved_ref = self.save_reference and target.ref_params is not None
        abstract = _abstract(_stored_part(self, target))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract),
                data=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
        tree = restored.state
        state = TrainState(
            step=tree["step"],
            params=tree["params"],
            opt_state=tree["opt_state"],
            ref_params=tree["ref_params"] if saved_ref else target.ref_params,
            rng=jax.random.wrap_key_data(tree["rng"]),
            skipped_updates=tree["skipped_updates"],
        )
        return state, dict(restored.data), dict(restored.meta)

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON `meta` item (config etc.) of a checkpoint, without loading any array."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored.meta)

    def saved_shapes(self, step: int | None = None) -> dict[str, tuple[tuple[int, ...], str]]:
        """{leaf path: (shape, dtype)} of a checkpoint's train state, from its metadata."""
        step = self.latest_step() if step is None else step
        tree = self._manager.item_metadata(step)["state"]
        tree = getattr(tree, "tree", tree)
        return _shapes(tree)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
