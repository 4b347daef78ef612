"""Orbax checkpoints of the full training state, data iterator position and config, each
with a fingerprint of its state that a restore checks."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from aapo_jax import sharding
from aapo_jax.types import TrainState

logger = logging.getLogger(__name__)

# Keys of the `meta` item that the checkpointer itself writes.
FINGERPRINT = "fingerprint"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back, or whose state does not verify.

    Attributes:
      step: the checkpoint's step.
      directory: the checkpoints' directory.
      reason: what failed, in a line.
    """

    def __init__(self, step: int, directory: Path, reason: str):
        self.step, self.directory, self.reason = step, directory, reason
        super().__init__(f"the step-{step} checkpoint in {directory} is unusable: {reason}")


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


def _checksum(x) -> jax.Array:
    """uint32[2]: the wrapped sums of the words of `x`'s bits and of those words times odd
    position weights, so that overwritten, zeroed or reordered bytes change it."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        words = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(x.dtype.itemsize, jnp.uint32)
        words = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    words = words.reshape(-1)
    weights = jax.lax.iota(jnp.uint32, words.shape[0]) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.stack([jnp.sum(words, dtype=jnp.uint32), jnp.sum(words * weights, dtype=jnp.uint32)])


def _finite(x) -> jax.Array:
    x = jnp.asarray(x)
    return jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)


@jax.jit
def _fingerprint_arrays(tree) -> tuple[Any, Any]:
    return jax.tree.map(_checksum, tree), jax.tree.map(_finite, tree)


def _leaf_path(path) -> str:
    """A leaf's path as `params/layers/attn/q_kernel`: a live state's leaves sit in NNX
    variables (`.../value`), the saved metadata's do not."""
    return jax.tree_util.keystr(path, simple=True, separator="/").removesuffix("/value")


def _leaf_paths(tree) -> list[str]:
    return [_leaf_path(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A train state's identity: a checksum of every leaf's bits, and the leaves that hold
    a NaN or inf. Computed on device (one pass over the state); saved with a checkpoint and
    compared when it is restored."""

    checksums: dict[str, str]  # leaf path -> 16 hex digits
    non_finite: tuple[str, ...]

    @classmethod
    def of(cls, tree) -> Fingerprint:
        """The fingerprint of a saveable tree (`_to_saveable`); a collective: every process
        calls it."""
        checksums, finite = sharding.to_host(_fingerprint_arrays(tree))
        paths = _leaf_paths(tree)
        hexes = ["".join(f"{int(w):08x}" for w in c) for c in jax.tree.leaves(checksums)]
        ok = [bool(f) for f in jax.tree.leaves(finite)]
        return cls(
            dict(zip(paths, hexes, strict=True)),
            tuple(p for p, good in zip(paths, ok, strict=True) if not good),
        )

    def mismatch(self, saved: dict[str, str]) -> str:
        """How this (restored) state differs from the fingerprint saved with it ('' if not)."""
        differ = sorted(
            k for k in set(saved) | set(self.checksums) if saved.get(k) != self.checksums.get(k)
        )
        if not differ:
            return ""
        more = f" (and {len(differ) - 3} more)" if len(differ) > 3 else ""
        return f"its data differ from what was saved in {', '.join(differ[:3])}{more}"


@dataclasses.dataclass
class _KeepNewestAnd:
    """Orbax preservation policy: the newest `n` checkpoints, and step `verified` (the last
    checkpoint verified by a restore, while the newer ones are unverified)."""

    n: int
    verified: int | None = None

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        del context
        newest = sorted(c.step for c in checkpoints)[-self.n :]
        return [c.step in newest or c.step == self.verified for c in checkpoints]


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
        _leaf_path(path): (
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
    if not saved:
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


class StateMismatchError(ValueError):
    """A checkpoint written for another model or optimizer (its leaves differ from the
    target's); `str()` names up to three of them (`describe_mismatch`)."""


# Where checkpoints that fail to restore are moved (beside `checkpoints/`), so that the
# run goes on from an older one without overwriting them.
UNUSABLE_DIR = "unusable_checkpoints"


class Checkpointer:
    """Saves and restores `TrainState` + JSON side data under `directory`.

    Each checkpoint holds the params, optimizer state, step, rng and skipped-update
    count; the reference params only when `save_reference` (i.e. when they are not
    the initial weights, which the trainer reloads from the source checkpoint);
    and two JSON items: `data` (the data iterator state) and `meta` (config etc., and the
    state's `Fingerprint` under `meta["fingerprint"]`). Saving is asynchronous; `wait()`
    blocks until the last save is on disk.

    A save refuses a state with a NaN or inf (`FloatingPointError`). A restore checks what
    it reads against the saved fingerprint and for non-finite values (`CheckpointError`);
    `restore_newest` then falls back to the previous checkpoint. Rotation keeps the newest
    `max_to_keep` checkpoints and, while this process runs, the one it restored (verified),
    so that newer, never-read ones cannot rotate the last known-good state away.
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
        self._policy = _KeepNewestAnd(max_to_keep)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                preservation_policy=self._policy,
                enable_async_checkpointing=async_save,
                create=True,
            ),
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )
        self.unusable: dict[int, str] = {}  # step -> why it could not be used (warned once)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every checkpoint's step, oldest first."""
        return sorted(self._manager.all_steps())

    @property
    def verified_step(self) -> int | None:
        """The checkpoint this process restored and verified (kept by rotation), if any."""
        return self._policy.verified

    def save(
        self, step: int, state: TrainState, *, data: dict, meta: dict, force: bool = True
    ) -> bool:
        """Save at `step` (returns whether a checkpoint was written).

        Raises:
          FloatingPointError: the state holds a NaN or inf (named); nothing is written.
        """
        if not self.save_reference:
            state = state.replace(ref_params=None)
        tree = _to_saveable(state)
        fingerprint = Fingerprint.of(tree)
        if fingerprint.non_finite:
            raise FloatingPointError(
                f"not saving the step-{step} state: {_listing(fingerprint.non_finite)} hold a "
                f"NaN or inf. The checkpoints in {self.directory} (newest: step "
                f"{self.latest_step()}) are left as they are."
            )
        return self._manager.save(
            int(step),
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree),
                data=ocp.args.JsonSave(data),
                meta=ocp.args.JsonSave({**meta, FINGERPRINT: fingerprint.checksums}),
            ),
            force=force,
        )

    def restore(
        self, target: TrainState, step: int | None = None
    ) -> tuple[TrainState, dict, dict[str, Any]]:
        """Restore into the structure and shardings of `target`, verified.

        `target` is a live state or one of `jax.ShapeDtypeStruct` leaves that carry
        shardings; then nothing but the checkpoint is read, straight onto them.
        The reference params are taken from `target` when they were not saved.
        Returns (state, data, meta).

        Raises:
          FileNotFoundError: no checkpoint.
          StateMismatchError: the checkpoint's leaves differ from `target`'s.
          CheckpointError: it cannot be read, its data differ from its fingerprint, or it
            holds a NaN or inf.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        mismatch = describe_mismatch(self, target, step)
        if mismatch:
            raise StateMismatchError(mismatch)
        saved_ref = self.save_reference and target.ref_params is not None
        abstract = _abstract(_stored_part(self, target))
        restored, error = None, None
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract),
                    data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore(),
                ),
            )
            if restored.meta is None or restored.data is None:
                raise FileNotFoundError("its meta or data item is missing")
        except Exception as e:  # every read failure is reported with its step
            error = _reason(e)
            _quiet_abandoned_reads()
        error = _first_error_everywhere(error)
        if error:
            raise CheckpointError(step, self.directory, f"reading it failed: {error}")
        tree = restored.state
        meta = dict(restored.meta)
        fingerprint = Fingerprint.of(tree)
        if FINGERPRINT in meta:
            differ = fingerprint.mismatch(meta[FINGERPRINT])
            if differ:
                raise CheckpointError(step, self.directory, differ)
        else:
            logger.warning(
                "the step-%d checkpoint in %s has no fingerprint (written by an older "
                "version): only its values' finiteness is checked.",
                step,
                self.directory,
            )
        if fingerprint.non_finite:
            raise CheckpointError(
                step, self.directory, f"{_listing(fingerprint.non_finite)} hold a NaN or inf"
            )
        state = TrainState(
            step=tree["step"],
            params=tree["params"],
            opt_state=tree["opt_state"],
            ref_params=tree["ref_params"] if saved_ref else target.ref_params,
            rng=jax.random.wrap_key_data(tree["rng"]),
            skipped_updates=tree["skipped_updates"],
            base=target.base,  # frozen LoRA base: never saved, the target's own
        )
        return state, dict(restored.data), meta

    def restore_newest(
        self, target: TrainState, *, set_aside: bool = True
    ) -> tuple[TrainState, dict, dict[str, Any]] | None:
        """The newest checkpoint that restores and verifies (see `restore`), or None if
        there is none at all.

        A checkpoint that fails gets a warning naming its step, the directory and the
        reason, and the previous one is tried. With `set_aside` (a run resuming), failed
        ones newer than the one restored are moved to `../unusable_checkpoints/`, so that
        the run can save those steps again, and the one restored is kept by rotation while
        this process runs.

        Raises:
          StateMismatchError: a checkpoint written for another model or optimizer.
          CheckpointError: every checkpoint failed (each one's reason listed).
        """
        steps = self.all_steps()
        if not steps:
            return None
        for step in reversed(steps):
            if step in self.unusable:
                continue
            try:
                restored = self.restore(target, step)
            except CheckpointError as e:
                self._mark_unusable(step, e.reason)
                continue
            if set_aside:
                self._set_aside([s for s in self.unusable if s > step])
                self._policy.verified = step
            return restored
        reasons = "; ".join(f"step {s}: {self.unusable[s]}" for s in reversed(steps))
        raise CheckpointError(
            steps[-1],
            self.directory,
            f"no checkpoint there restores ({reasons}). Move the directory away to start "
            "afresh, or restore one by hand.",
        )

    def _mark_unusable(self, step: int, reason: str) -> None:
        self.unusable[step] = reason
        older = [s for s in self.all_steps() if s < step and s not in self.unusable]
        then = f"trying step {older[-1]}" if older else "no older checkpoint is left"
        logger.warning(
            "the step-%d checkpoint in %s cannot be used: %s; %s.",
            step,
            self.directory,
            reason,
            then,
        )

    def _set_aside(self, steps: Sequence[int]) -> None:
        """Moves unusable checkpoints newer than the restored one out of the way."""
        if not steps:
            return
        if jax.process_index() == 0:
            aside = self.directory.parent / UNUSABLE_DIR
            aside.mkdir(exist_ok=True)
            for step in steps:
                source = self.directory / str(step)
                if source.exists():
                    target, n = aside / str(step), 1
                    while target.exists():
                        target, n = aside / f"{step}.{n}", n + 1
                    source.rename(target)
                    logger.warning("moved the unusable step-%d checkpoint to %s", step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("aapo_jax.checkpoint.set_aside")
        self._manager.reload()

    def read_meta(self, step: int | None = None) -> dict[str, Any]:
        """The JSON `meta` item (config etc.) of a checkpoint, without loading any array.

        Raises:
          FileNotFoundError: no checkpoint.
          CheckpointError: its meta item cannot be read.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}.")
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
            )
            if not isinstance(restored.meta, dict) or "config" not in restored.meta:
                raise ValueError("its meta item holds no config")
        except Exception as e:  # reported with the step
            raise CheckpointError(step, self.directory, f"its meta item: {_reason(e)}") from e
        return dict(restored.meta)

    def newest_meta(self) -> tuple[int, dict[str, Any]] | None:
        """(step, meta) of the newest checkpoint whose meta item reads; those that do not
        are warned about (once) and skipped. None when no checkpoint has one."""
        for step in reversed(self.all_steps()):
            if step in self.unusable:
                continue
            try:
                return step, self.read_meta(step)
            except CheckpointError as e:
                self._mark_unusable(step, e.reason)
        return None

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


def _listing(paths: Sequence[str]) -> str:
    more = f" (and {len(paths) - 3} more)" if len(paths) > 3 else ""
    return ", ".join(paths[:3]) + more


def _reason(error: BaseException) -> str:
    """An exception in a line: its type and the first line of its message."""
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    for noise in (" See full TensorStore details", " [tensorstore_spec"):  # pages of JSON
        line = line.split(noise)[0]
    return f"{type(error).__name__}: {line[:300]}".rstrip(": ")


def _is_abandoned_read(error: BaseException | None, where: object = None) -> bool:
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    read = getattr(where, "__qualname__", "").startswith("_read_array")
    return closed_loop or read


def _quiet_abandoned_reads() -> None:
    """Once orbax has given up on a damaged checkpoint, its other reads still in flight end
    later on a closed event loop, each printing a traceback (hundreds of lines that bury the
    warning). From then on, drop those and only those; everything else still prints."""
    if getattr(sys.unraisablehook, "_aapo_quiet", False):
        return
    unraisable, excepthook = sys.unraisablehook, sys.excepthook

    def quiet_unraisable(u):
        if not _is_abandoned_read(u.exc_value, u.object):
            unraisable(u)

    def quiet_excepthook(kind, error, tb):
        if not _is_abandoned_read(error):
            excepthook(kind, error, tb)

    def quiet_log(record: logging.LogRecord) -> bool:  # asyncio's "never retrieved"
        return "_read_array" not in record.getMessage()

    quiet_unraisable._aapo_quiet = True
    sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
    logging.getLogger("asyncio").addFilter(quiet_log)


def _first_error_everywhere(error: str | None) -> str | None:
    """With several processes, the first process's error if any process had one (they must
    all give up on a checkpoint together)."""
    if jax.process_count() == 1:
        return error
    from jax.experimental import multihost_utils

    failed = multihost_utils.process_allgather(np.asarray(error is not None))
    if error is None and np.any(failed):
        return "another process could not read it"
    return error
