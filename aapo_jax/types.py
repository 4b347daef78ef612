"""The records an RL step passes between its stages: prompts, the rollout, the train state."""

from __future__ import annotations

import flax.struct
import optax
from flax import nnx
from jaxtyping import Array, Float, Int

from aapo_jax.models import lora
from aapo_jax.sampling import SamplerOutput


@flax.struct.dataclass
class TrainState:
    """Everything a step reads and writes. `ref_params` is None when no reference is used.

    With LoRA (`ModelConfig.lora_rank` > 0) `params` holds only the adapters (what trains,
    what AdamW and the checkpoints hold), `base` the frozen rest of the model, stored once
    and never checkpointed, and `ref_params` is None: the reference is the base with the
    adapters off. Without LoRA `base` is None.
    """

    step: Int[Array, ""]
    params: nnx.State
    opt_state: optax.OptState
    ref_params: nnx.State | None
    rng: Array
    skipped_updates: Int[Array, ""]
    base: nnx.State | None = None

    def policy_weights(self, params: nnx.State | None = None) -> tuple[nnx.State, ...]:
        """The states `nnx.merge(graphdef, *...)` takes for the policy (`params` in place of
        the state's own, e.g. inside a gradient)."""
        params = self.params if params is None else params
        return (params,) if self.base is None else (params, self.base)

    def reference_weights(self) -> tuple[nnx.State, ...] | None:
        """The states of the reference model: its copy, or the base with the adapters off."""
        if self.base is not None:
            return (lora.adapters_off(self.params), self.base)
        return None if self.ref_params is None else (self.ref_params,)


@flax.struct.dataclass
class PromptBatch:
    """B left-padded prompts; tasks with a JAX-native reward add the answers as tokens.

    Attributes:
      ids, mask: int32[B, P] left-padded prompt tokens and their mask (1 = token).
      targets: int32[B, A] answer tokens padded with -1 (token rewards only).
      target_len: int32[B] answer lengths (token rewards only).
      index: int32[B] each prompt's position in the run's list of training problems, so
        that a host scorer finds its gold answer (`rollout.HostScorer`).
    """

    ids: Int[Array, "B P"]
    mask: Array
    targets: Int[Array, "B A"] | None = None
    target_len: Int[Array, " B"] | None = None
    index: Int[Array, " B"] | None = None


@flax.struct.dataclass
class Rollout:
    """One step's completions, G per prompt (rows b·G + g), and once scored their rewards.

    The sampling stage fills `prompts`, `policy` and (when the algorithm needs the
    reference rollout) `reference`, paired with `policy` row by row; the scoring
    stage fills `rewards` and `ref_rewards`, and may add per-completion extras that
    the train step turns into metrics: `reward_components` (each named part of a
    weighted reward, logged as its mean) and `reward_counts` (0/1 events such as a
    verifier's timeouts, logged as their total). Every leaf's leading dimension is
    rows (B or N = B·G), so a data-parallel mesh splits the whole record by prompts.
    """

    prompts: PromptBatch
    policy: SamplerOutput
    reference: SamplerOutput | None = None
    rewards: Float[Array, "B G"] | None = None
    ref_rewards: Float[Array, "B G"] | None = None
    reward_components: dict[str, Float[Array, "B G"]] | None = None
    reward_counts: dict[str, Float[Array, "B G"]] | None = None

    @property
    def group_size(self) -> int:
        """G: completions per prompt."""
        return self.policy.tokens.shape[0] // self.prompts.ids.shape[0]
