"""Frozen typed configs for the RL step, and their validated conversion from ml_collections."""

from __future__ import annotations

import dataclasses
import math
import string
from collections.abc import Mapping
from typing import Any, Literal

import ml_collections

from aapo_jax import algorithms, fields, losses
from aapo_jax.data.sources import DataConfig
from aapo_jax.fields import check as _check
from aapo_jax.fields import choice, from_mapping
from aapo_jax.fields import unused as _unused
from aapo_jax.models import lora as lora_lib
from aapo_jax.models.config import ATTENTION_IMPLEMENTATIONS, REMAT_POLICIES
from aapo_jax.sampling import SamplerSettings

# `train.steps` / `optim.total_steps` meaning one epoch over the training prompts.
ONE_EPOCH = -1
# The run's length, and so its schedule's (the two must be equal, `ExperimentConfig`).
DEFAULT_STEPS = 100


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with the paper's schedules, global-norm clipping and gradient accumulation.

    schedule: "constant" (linear warmup, then constant) or "cosine" (linear
    warmup, then cosine decay to `final_lr_fraction · learning_rate` at
    `total_steps`). `warmup_ratio` is a fraction of `total_steps`; `warmup_style`
    "above_zero" ramps over round(ratio · steps) steps starting at peak/(w+1), so the
    first step already moves, and "transformers" over ceil(ratio · steps) steps from
    lr 0 at step 0 (transformers' `get_*_schedule_with_warmup`, what TRL runs inherit).
    The update splits a step's rows into micro-batches whose loss sums add up to the
    exact global token mean: `micro_batch_tokens` > 0 bounds the (prompt + completion)
    tokens each device holds per micro-batch (`train_step.micro_batch_count`), else
    there are `grad_accum_steps` of them. Set one or the other. `length_buckets` > 1 sorts
    the rows by completion length into the micro-batches and cuts each micro-batch to the
    shortest of `length_buckets` lengths T·i/n that holds its rows
    (`train_step.by_length`): the same gradient, computed on about the real tokens rather
    than every row padded to T, at the cost of compiling one update branch per length.
    """

    learning_rate: float = 1e-6
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = 0.0
    warmup_style: Literal["above_zero", "transformers"] = "above_zero"
    total_steps: int = DEFAULT_STEPS
    final_lr_fraction: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float = 1.0
    grad_accum_steps: int = 1
    micro_batch_tokens: int = 0
    length_buckets: int = 1

    def __post_init__(self):
        _check(self.learning_rate > 0, "optim.learning_rate", self.learning_rate, "> 0")
        _check(0 <= self.warmup_ratio < 1, "optim.warmup_ratio", self.warmup_ratio, "in [0, 1)")
        _check(
            self.total_steps >= 1 or self.total_steps == ONE_EPOCH,
            "optim.total_steps",
            self.total_steps,
            f"≥ 1 (or {ONE_EPOCH}: one epoch, resolved when the data is loaded)",
        )
        _check(
            0 <= self.final_lr_fraction <= 1,
            "optim.final_lr_fraction",
            self.final_lr_fraction,
            "in [0, 1]",
        )
        _check(self.max_grad_norm >= 0, "optim.max_grad_norm", self.max_grad_norm, "≥ 0 (0 = off)")
        _check(self.grad_accum_steps >= 1, "optim.grad_accum_steps", self.grad_accum_steps, "≥ 1")
        _check(
            self.micro_batch_tokens >= 0,
            "optim.micro_batch_tokens",
            self.micro_batch_tokens,
            "≥ 0 (0 = use grad_accum_steps)",
        )
        _check(
            self.length_buckets >= 1,
            "optim.length_buckets",
            self.length_buckets,
            "≥ 1 (1 = every micro-batch spans the whole budget)",
        )
        _check(
            self.micro_batch_tokens == 0 or self.grad_accum_steps == 1,
            "optim.grad_accum_steps",
            self.grad_accum_steps,
            "1 when optim.micro_batch_tokens is set (the budget picks the micro-batch count)",
        )

    @property
    def warmup_steps(self) -> int:
        if self.total_steps == ONE_EPOCH:
            raise ValueError(
                "optim.total_steps=-1 (one epoch) is resolved from the data first "
                "(`configs.resolve_epoch_steps`)."
            )
        steps = self.warmup_ratio * self.total_steps
        return math.ceil(steps) if self.warmup_style == "transformers" else round(steps)


DEFAULT_ALGORITHM = "aapo"


def _default_hparams() -> dict[str, Any]:
    return algorithms.get_algorithm(DEFAULT_ALGORITHM).defaults()


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """Which algorithm (`algorithms.ALGORITHMS`), its hyper-parameters, and the reference policy.

    hparams: settings of the algorithm's own hyper-parameters (`Algorithm.hparams`);
    missing ones take the algorithm's defaults, and a name the algorithm does not use
    is an error. After validation it holds every hyper-parameter, resolved, and
    `algo` the `algorithms.ConfiguredAlgorithm` the train step calls (resolved once).
    kl_estimator: how KL(π_θ ‖ π_ref) is estimated wherever it is computed (a loss's
    KL penalty, and the `kl` metric); a name in `losses.KL_ESTIMATORS`.
    kl_metric: when a reference policy exists but the loss does not need its
    log-probs (AAPO), still compute them for the `kl` metric. Off by default: that
    reference forward feeds nothing but the metric, and costs about a fifth of the
    update's FLOPs at the paper configs (AAPO's trainer logs no KL at β = 0 either).
    reference: "frozen" (the initial weights: the paper's default), "sync"
    (copy the policy every `reference_sync_every` steps) or "ema" (after each
    step ref ← (1 − α)·ref + α·policy with α = `reference_ema_rate`).
    loss_aggregation: how the loss over a step's tokens is normalised, a name in
    `losses.AGGREGATIONS`: "token_mean" (the algorithm's own: one token mean, or a
    sequence mean with its `seq_mean`), "seq_mean", "per_prompt_token_mean" (TRL 0.16 as
    the AAPO authors ran it: a token mean per prompt's G rows, averaged over prompts;
    the paper configs) or "seq_mean_token_sum" (Dr. GRPO).
    logprob_temperature: the update's log-probs (policy and reference) are those of
    logits / τ. 1.0 is the model's own distribution; TRL ≥ 0.16 uses the sampling
    temperature, as the paper configs do.
    """

    algorithm: str = DEFAULT_ALGORITHM
    hparams: tuple[tuple[str, Any], ...] = fields.config_default(_default_hparams, default=())
    group_size: int = 8
    kl_estimator: str = choice("k3", lambda: losses.KL_ESTIMATORS)
    kl_metric: bool = False
    reference: Literal["frozen", "sync", "ema"] = "frozen"
    reference_sync_every: int = 0
    reference_ema_rate: float = 0.0
    logprob_chunk_size: int = 128
    logprob_temperature: float = 1.0
    loss_aggregation: str = choice("token_mean", lambda: losses.AGGREGATIONS)

    def __post_init__(self):
        fields.check_choices(self, "rl")
        _check(
            self.logprob_temperature > 0,
            "rl.logprob_temperature",
            self.logprob_temperature,
            "> 0",
        )
        algo = algorithms.get_algorithm(self.algorithm).configure(
            dict(self.hparams), name=self.algorithm, field="rl.hparams"
        )
        object.__setattr__(self, "hparams", tuple(sorted(algo.hparams.items())))
        object.__setattr__(self, "_algo", algo)  # not a field: no part of asdict or ==
        if algo.hparams.get("seq_mean"):
            _check(
                self.loss_aggregation == "token_mean",
                "rl.loss_aggregation",
                self.loss_aggregation,
                "'token_mean' with rl.hparams.seq_mean=True (set one of the two)",
            )
        _check(
            self.group_size >= algo.spec.min_group_size,
            "rl.group_size",
            self.group_size,
            f"≥ {algo.spec.min_group_size} for algorithm {self.algorithm!r}",
        )
        if not self.uses_reference:
            _unused(
                self.reference,
                "frozen",
                "rl.reference",
                "an algorithm that uses a reference policy (its rollout or its log-probs)",
            )
        if self.reference == "sync":
            _check(
                self.reference_sync_every >= 1,
                "rl.reference_sync_every",
                self.reference_sync_every,
                "≥ 1 when rl.reference='sync'",
            )
        else:
            _unused(self.reference_sync_every, 0, "rl.reference_sync_every", "rl.reference='sync'")
        if self.reference == "ema":
            _check(
                0 < self.reference_ema_rate <= 1,
                "rl.reference_ema_rate",
                self.reference_ema_rate,
                "in (0, 1] when rl.reference='ema'",
            )
        else:
            _unused(self.reference_ema_rate, 0.0, "rl.reference_ema_rate", "rl.reference='ema'")
        if not self.computes_reference_logprobs:
            _unused(
                self.kl_estimator,
                "k3",
                "rl.kl_estimator",
                "a KL: an algorithm that needs reference log-probs, or a reference with "
                "rl.kl_metric=True",
            )
        _check(
            self.logprob_chunk_size >= 1, "rl.logprob_chunk_size", self.logprob_chunk_size, "≥ 1"
        )

    @property
    def algo(self) -> algorithms.ConfiguredAlgorithm:
        """The algorithm with its hyper-parameters, resolved when this config was made."""
        return self._algo

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """Every hyper-parameter of the algorithm, resolved (defaults + settings)."""
        return dict(self.hparams)

    @property
    def samples_reference(self) -> bool:
        """Whether each step samples the reference policy (AAPO's margin needs r̃)."""
        return self.algo.needs_reference_rollout

    @property
    def needs_reference_logprobs(self) -> bool:
        """Whether the loss scores policy completions under the reference (a KL term)."""
        return self.algo.needs_reference_logprobs

    @property
    def uses_reference(self) -> bool:
        """Whether the state keeps reference weights at all."""
        return self.samples_reference or self.needs_reference_logprobs

    @property
    def computes_reference_logprobs(self) -> bool:
        """Whether the update runs the reference forward (for the loss or the `kl` metric)."""
        return self.needs_reference_logprobs or (self.kl_metric and self.uses_reference)


@dataclasses.dataclass(frozen=True)
class RolloutSettings(SamplerSettings):
    """`sampling`: the rollout's `sampling.SamplerSettings`, the prompt budget P and where
    the decode loop reads the weights.

    max_prompt_length: prompts longer than this many tokens are dropped or cut
    (`prompt.overlong`); the rollout's prompt buffers are P wide. RL samples: the
    temperature must be > 0.
    decode_weights: where the decode loop reads the weights. "tensor": copies in the
    compute dtype made once per rollout, the MLP's hidden units, the vocabulary and the
    attention projections' head_dim split over every device
    (`decode_layouts.DECODE_TENSOR_RULES`): each step reads about 1/devices of every matmul
    weight and exchanges activations only.
    "replicated": whole copies on every device (no collective in the loop, every device
    reads all weights). "sharded": the training layout (XLA gathers each layer's weights
    on every decode step: least memory). "auto": "tensor" on a mesh that splits the
    weights, "replicated" on a data-parallel one, when the copies fit
    `decode_layouts.DECODE_WEIGHTS_SHARE` of a device's memory, else "sharded".
    kv_budget_gib: GiB per device for the decode KV caches of every decoded model (the
    policy's, and the reference's when it is sampled). 0: one decode pass over all of a
    step's prompts. > 0: the prompts each device decodes are split into the fewest equal
    sequential passes whose caches fit (`sampling.decode_passes`), inside the same
    program; the same tokens, slower by the passes' repeated weight reads.
    """

    max_prompt_length: int = 512
    decode_weights: Literal["auto", "sharded", "replicated", "tensor"] = "auto"
    kv_budget_gib: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check(
            self.max_prompt_length >= 1, "sampling.max_prompt_length", self.max_prompt_length, "≥ 1"
        )
        _check(self.temperature > 0, "sampling.temperature", self.temperature, "> 0 for RL")
        _check(
            self.kv_budget_gib >= 0,
            "sampling.kv_budget_gib",
            self.kv_budget_gib,
            "≥ 0 (0: one pass)",
        )


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes; one may be -1 (all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


def override_error(
    config: ml_collections.ConfigDict, path: str, value: str | None = None
) -> ValueError | None:
    """Why `--config.{path}={value}` cannot apply to `config`, or None when the field exists.

    A name under `rl.hparams` that the algorithm does not use gets the algorithm's own
    error (listing its hyper-parameters); any other missing name `unknown_fields_error`.
    """
    *parents, key = path.split(".")
    section = config
    for depth, name in enumerate([*parents, key]):
        prefix = ".".join(parents[:depth])
        if not isinstance(section, ml_collections.ConfigDict):
            return ValueError(f"config field {prefix}={section!r} has no field {name!r}.")
        if name not in section:
            if prefix == "rl.hparams":
                spec = algorithms.get_algorithm(config.rl.algorithm)
                try:
                    spec.resolve({name: value}, name=config.rl.algorithm, field=prefix)
                except ValueError as e:
                    return e
            return fields.unknown_fields_error(prefix, [name], section.keys())
        section = section[name]
    return None


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A local Hugging Face checkpoint directory and how to hold it in memory.

    Precision policy: the trained weights and AdamW's moments are `param_dtype`
    masters (fp32 by default: a 1e-6 step on a bf16 weight of 0.02 rounds away), the
    forward computes in `dtype` (weights cast inside it), and the frozen or synced
    reference is stored in `reference_dtype` (default: the compute dtype; an EMA
    reference, which accumulates small steps, defaults to `param_dtype`).
    """

    path: str = ""
    tokenizer_path: str = ""  # default: `path`
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute (activations, matmul inputs)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights + AdamW moments
    reference_dtype: Literal["", "float32", "bfloat16"] = ""  # "": compute (EMA: param_dtype)
    remat: str = choice("none", REMAT_POLICIES)
    attention: str = choice("auto", ATTENTION_IMPLEMENTATIONS)
    attention_block: int = 512
    scan_unroll: int = 1  # layers per forward layer-scan iteration; -1: all (tiny CPU models)
    # LoRA (`models.lora`): rank > 0 trains low-rank adapters on the projections that
    # `lora_targets` (a regex over paths such as "layers/attn/q_kernel") matches; the
    # rest of the model is frozen in `dtype` (or nf4 with lora_base_qtype="nf4": QLoRA,
    # one scale per `lora_tile_size` inputs), stored once, and the reference is that base
    # with the adapters off. Only the adapters are trained, held by AdamW and checkpointed.
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0: the rank (the adapters' scale alpha / r is 1)
    lora_targets: str = lora_lib.DEFAULT_TARGETS
    lora_base_qtype: str = choice("", lora_lib.BASE_QTYPES)
    lora_tile_size: int = 64

    def __post_init__(self):
        fields.check_choices(self, "model")
        _check(self.lora_rank >= 0, "model.lora_rank", self.lora_rank, "≥ 0 (0: no LoRA)")
        _check(self.lora_alpha >= 0, "model.lora_alpha", self.lora_alpha, "≥ 0 (0: the rank)")
        _check(self.lora_tile_size >= 1, "model.lora_tile_size", self.lora_tile_size, "≥ 1")
        _check(
            not self.lora_base_qtype or self.lora_rank > 0,
            "model.lora_base_qtype",
            self.lora_base_qtype,
            "'' unless model.lora_rank > 0 (it quantizes a LoRA model's frozen base)",
        )
        if self.lora_rank:
            lora_lib.targeted(self.lora_targets)
        _check(bool(self.path), "model.path", self.path, "a local Hugging Face checkpoint dir")
        _check(self.attention_block >= 1, "model.attention_block", self.attention_block, "≥ 1")
        _check(
            self.scan_unroll == -1 or self.scan_unroll >= 1,
            "model.scan_unroll",
            self.scan_unroll,
            "-1 (every layer) or ≥ 1",
        )

    def model_kwargs(self) -> dict[str, Any]:
        """`models.load_hf_checkpoint` / `abstract_hf_model` keyword arguments."""
        return dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            remat=self.remat,
            attention=self.attention,
            attention_block=self.attention_block,
            scan_unroll=self.scan_unroll,
            lora_rank=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_targets=self.lora_targets,
            lora_base_qtype=self.lora_base_qtype,
            lora_tile_size=self.lora_tile_size,
        )

    def reference_storage(self, reference: str) -> str:
        """The reference weights' dtype for an `rl.reference` mode ("frozen", "sync", "ema")."""
        if self.reference_dtype:
            return self.reference_dtype
        return self.param_dtype if reference == "ema" else self.dtype


@dataclasses.dataclass(frozen=True)
class PromptConfig:
    """How a question becomes a prompt: a plain `{question}` template and/or the chat template.

    overlong: a prompt longer than `sampling.max_prompt_length` tokens is dropped
    ("drop", counted) or keeps its last max_prompt_length tokens ("truncate_left", as
    TRL does; the paper configs).
    """

    template: str = "{question}"
    system_prompt: str = ""
    use_chat_template: bool = False
    overlong: Literal["drop", "truncate_left"] = "drop"

    def __post_init__(self):
        _check(
            "{question}" in self.template, "prompt.template", self.template, "a '{question}' field"
        )


def _check_host_reward(field: str, name: str) -> None:
    """A host reward name must resolve (`rewards.get_host_reward`) when the config is made."""
    from aapo_jax import rewards

    try:
        rewards.get_host_reward(name)
    except ValueError as e:
        raise ValueError(f"config field {field}={name!r} is invalid: {e}") from None


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    """Host rewards on decoded text (`names` from rewards.HOST_REWARDS or 'gym:<task>', summed
    with `weights`), time-bounded per sample; or one JAX-native token reward (`kind='token'`).
    """

    kind: Literal["host", "token"] = "host"
    names: tuple[str, ...] = ("accuracy",)
    weights: tuple[float, ...] = (1.0,)
    timeout_s: float = 5.0
    num_workers: int = 2
    eval_name: str = ""  # the 0/1 verifier for eval accuracy; default: names[0] (host)
    # Stop the run (keeping the last checkpoint) when more than `max_failed_fraction` of a
    # step's samples failed in scoring (timed out or raised) for `max_failed_steps` steps
    # in a row; 0 steps = never.
    max_failed_fraction: float = 0.5
    max_failed_steps: int = 3

    def __post_init__(self):
        _check(len(self.names) >= 1, "reward.names", self.names, "at least one reward")
        if not self.eval_name:
            _check(
                self.kind == "host",
                "reward.eval_name",
                self.eval_name,
                "a host reward name (a 0/1 verifier) when kind='token'",
            )
            object.__setattr__(self, "eval_name", self.names[0])
        _check(
            len(self.weights) == len(self.names),
            "reward.weights",
            self.weights,
            f"one weight per name ({len(self.names)})",
        )
        if self.kind == "token":
            from aapo_jax.rewards import tokens

            _check(
                len(self.names) == 1 and self.names[0] in tokens.TOKEN_REWARDS,
                "reward.names",
                self.names,
                f"one of {sorted(tokens.TOKEN_REWARDS)} for kind='token'",
            )
        else:
            for i, name in enumerate(self.names):
                _check_host_reward(f"reward.names[{i}]", name)
        _check_host_reward("reward.eval_name", self.eval_name)
        _check(self.timeout_s > 0, "reward.timeout_s", self.timeout_s, "> 0")
        _check(self.num_workers >= 0, "reward.num_workers", self.num_workers, "≥ 0")
        _check(
            0.0 <= self.max_failed_fraction < 1.0,
            "reward.max_failed_fraction",
            self.max_failed_fraction,
            "in [0, 1)",
        )
        _check(
            self.max_failed_steps >= 0,
            "reward.max_failed_steps",
            self.max_failed_steps,
            "≥ 0 (0 = never stop)",
        )


@dataclasses.dataclass(frozen=True)
class TrainLoopConfig:
    """The host loop: steps, batch, logging, evaluation and checkpoint cadence.

    steps: how many updates; -1 (`ONE_EPOCH`, TRL's max_steps=-1) is one pass over the
    training prompts, ⌊prompts / prompts_per_step⌋ steps, resolved once the data is
    loaded (`resolve_epoch_steps`).
    """

    steps: int = DEFAULT_STEPS
    prompts_per_step: int = 16
    seed: int = 0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only before and after training
    eval_size: int = 0  # 0: the whole eval split
    eval_batch_size: int = 64
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    samples_every: int = 10
    num_samples_logged: int = 4
    export_hf: bool = False
    tensorboard: bool = True
    wandb_project: str = ""
    # Resume a workdir whose checkpoint was written under a config that differs in a
    # field outside `RESUMABLE_CHANGES` (the differences are still logged).
    allow_config_change: bool = False
    # Abort (keeping the last checkpoint) after this many updates in a row were skipped
    # for a non-finite loss or gradient; 0 = never.
    max_consecutive_skips: int = 10

    def __post_init__(self):
        _check(
            self.steps >= 1 or self.steps == ONE_EPOCH,
            "train.steps",
            self.steps,
            f"≥ 1 (or {ONE_EPOCH}: one epoch over the training prompts)",
        )
        for name in (
            "prompts_per_step",
            "log_every",
            "eval_batch_size",
            "keep_checkpoints",
        ):
            _check(getattr(self, name) >= 1, f"train.{name}", getattr(self, name), "≥ 1")
        for name in (
            "eval_every",
            "eval_size",
            "checkpoint_every",
            "samples_every",
            "max_consecutive_skips",
        ):
            _check(getattr(self, name) >= 0, f"train.{name}", getattr(self, name), "≥ 0 (0 = off)")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one training run needs, validated before anything is compiled.

    name: the run's name (progress bar, summary, TensorBoard / W&B). It may hold the
    placeholders `{algorithm}`, `{group_size}` and `{seed}`, filled in here, so that a
    name written before the algorithm is switched still names it (e.g. the quickstart's
    "quickstart-{algorithm}-G{group_size}-s{seed}").
    """

    model: ModelSource
    data: DataConfig
    prompt: PromptConfig = PromptConfig()
    rl: RLConfig = RLConfig()
    optim: OptimConfig = OptimConfig()
    sampling: RolloutSettings = RolloutSettings()
    reward: RewardConfig = RewardConfig()
    mesh: MeshConfig = MeshConfig()
    train: TrainLoopConfig = TrainLoopConfig()
    name: str = "run"

    def __post_init__(self):
        _check(
            self.optim.total_steps == self.train.steps,
            "optim.total_steps",
            self.optim.total_steps,
            f"equal to train.steps={self.train.steps} (the schedule's length)",
        )
        values = dict(
            algorithm=self.rl.algorithm, group_size=self.rl.group_size, seed=self.train.seed
        )
        placeholders = {f for _, f, _, _ in string.Formatter().parse(self.name) if f is not None}
        _check(
            placeholders <= set(values),
            "name",
            self.name,
            f"a run name whose placeholders are among {sorted('{' + k + '}' for k in values)}",
        )
        object.__setattr__(self, "name", self.name.format(**values))
        _check(
            not self.model.lora_rank or self.rl.reference == "frozen",
            "rl.reference",
            self.rl.reference,
            "'frozen' with LoRA (model.lora_rank > 0): the reference is the base model with "
            "the adapters off",
        )


# Fields that are one setting in the ml_collections config (`default_config`): overriding the
# second overrides the first. The schedule's length follows the run's.
LINKED_FIELDS = {"optim.total_steps": "train.steps"}


def default_config() -> ml_collections.ConfigDict:
    """Every field of `ExperimentConfig` with its default, as an ml_collections config.

    Generated from the dataclasses, so a new field is written once, with its default,
    and the command line can override it (`--config.rl.group_size=4`). Two fields differ
    from their dataclass shape: `rl.hparams` is a dict holding the default algorithm's
    hyper-parameters (`configs.base.set_algorithm` swaps them), and `data.gym_kwargs` a
    dict. `LINKED_FIELDS` share one reference: overriding `train.steps` also sets
    `optim.total_steps`. `model.path` (and the data) must still be given.
    """
    return fields.config_dict(ExperimentConfig, linked=LINKED_FIELDS)


def resolve_epoch_steps(config: ExperimentConfig, num_prompts: int) -> ExperimentConfig:
    """`config` with train.steps = -1 (one epoch) made concrete for `num_prompts` prompts.

    ⌊num_prompts / prompts_per_step⌋ steps (the last incomplete batch is dropped, as the
    loader does), and the schedule's `optim.total_steps` with them; other configs are
    returned unchanged.

    Raises:
      ValueError: fewer prompts than one step's batch.
    """
    if config.train.steps != ONE_EPOCH:
        return config
    steps = num_prompts // config.train.prompts_per_step
    if steps < 1:
        raise ValueError(
            f"train.steps=-1 (one epoch): {num_prompts} training prompts make no batch of "
            f"train.prompts_per_step={config.train.prompts_per_step}."
        )
    return dataclasses.replace(
        config,
        train=dataclasses.replace(config.train, steps=steps),
        optim=dataclasses.replace(config.optim, total_steps=steps),
    )


# Fields a resumed run may change: how long it runs (the schedule's length follows) and
# how it logs, evaluates, checkpoints and scores; not what is trained or how. Also which
# program reads the decode cache (`sampling.decode_attention`): the same attention, and a run
# saved before the field existed ran what "auto" picks off GPU.
RESUMABLE_CHANGES = (
    "name",
    "sampling.decode_attention",
    "train.steps",
    "optim.total_steps",
    "train.log_every",
    "train.eval_every",
    "train.eval_batch_size",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.samples_every",
    "train.num_samples_logged",
    "train.export_hf",
    "train.tensorboard",
    "train.wandb_project",
    "train.allow_config_change",
    "train.max_consecutive_skips",
    "reward.timeout_s",
    "reward.num_workers",
    "reward.max_failed_fraction",
    "reward.max_failed_steps",
)


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(tree, list | tuple):
        return {prefix: [_flatten(v) if isinstance(v, Mapping) else v for v in tree]}
    return {prefix: tree}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple]:
    """{dotted field: (saved value, current value)} for every field that differs.

    Both configs are nested mappings (`dataclasses.asdict` of an `ExperimentConfig`,
    as JSON); tuples and lists compare equal element by element.
    """
    old, new = _flatten(saved), _flatten(current)
    return {
        field: (old.get(field), new.get(field))
        for field in sorted(set(old) | set(new))
        if old.get(field) != new.get(field)
    }


def refused_resume_changes(changes: Mapping[str, tuple]) -> dict[str, tuple]:
    """The `config_changes` that refuse a resume: those outside `RESUMABLE_CHANGES`."""
    return {f: v for f, v in changes.items() if f not in RESUMABLE_CHANGES}


def experiment_config(config: Any) -> ExperimentConfig:
    """Validate an ml_collections ConfigDict (or dict) into a frozen `ExperimentConfig`."""
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if isinstance(config, Mapping) and "train" in config:
        # `optim.total_steps` follows `train.steps` (`LINKED_FIELDS`) but is validated first,
        # with `optim`: check the loop first so that a bad run length is named as it was set.
        from_mapping(TrainLoopConfig, config["train"], prefix="train")
    return from_mapping(ExperimentConfig, config)
