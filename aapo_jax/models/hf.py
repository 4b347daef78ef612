"""Import from and export to Hugging Face checkpoints (config.json + safetensors), without torch."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from aapo_jax import sharding as sharding_lib
from aapo_jax.models import lora as lora_lib
from aapo_jax.models.config import SUPPORTED_MODEL_TYPES, ModelConfig, RopeScaling
from aapo_jax.models.transformer import Transformer

logger = logging.getLogger(__name__)

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
# ModelConfig fields that describe how we run a checkpoint, not the checkpoint.
_RUNTIME_FIELDS = (
    "remat",
    "attention",
    "attention_block",
    "scan_unroll",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "lora_base_qtype",
    "lora_tile_size",
)
# Tensors some exporters keep that carry no weights of ours.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


# ---------------------------------------------------------------------------
# config.json <-> ModelConfig


def _rope_from_hf(hf: dict) -> tuple[float, RopeScaling | None]:
    """rope_theta and scaling from either config layout.

    transformers 5 writes `rope_parameters` (with `rope_theta` inside); hub
    checkpoints written by 4.x have top-level `rope_theta` and `rope_scaling`.
    """
    params = hf.get("rope_parameters")
    if params is not None:
        theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta = hf.get("rope_theta", 10000.0)
        scaling = hf.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise ValueError(
            f"config.json rope type {rope_type!r} is not supported "
            "(supported: 'default', 'llama3')."
        )
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]),
    )


def config_from_hf(hf: dict, *, dtype="float32", param_dtype=None, **runtime: Any) -> ModelConfig:
    """ModelConfig from a parsed Hugging Face config.json (4.x or 5.x layout).

    `param_dtype` defaults to `dtype`; `runtime` sets the other fields that are ours,
    not the checkpoint's (`remat`, `attention`, `attention_block`, `scan_unroll`).
    """
    unknown = sorted(set(runtime) - set(_RUNTIME_FIELDS))
    if unknown:
        raise TypeError(f"config_from_hf: unknown field(s) {unknown}; valid: {_RUNTIME_FIELDS}.")
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"config.json model_type={model_type!r} is not supported; "
            f"expected one of {SUPPORTED_MODEL_TYPES}."
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; only 'silu' is supported.")
    if hf.get("use_sliding_window", False):
        raise ValueError(
            "config.json use_sliding_window=true: sliding-window attention is not supported."
        )
    if model_type == "qwen2" and hf.get("sliding_window") is not None:
        logger.warning(
            "config.json sliding_window=%s is ignored: use_sliding_window is false, so every "
            "layer uses full attention (as transformers does).",
            hf["sliding_window"],
        )
    theta, scaling = _rope_from_hf(hf)
    heads = hf["num_attention_heads"]
    eos = hf.get("eos_token_id")
    attention_bias = bool(hf.get("attention_bias", False))
    dtype = jnp.dtype(dtype).name
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        model_type=model_type,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # Qwen2 always has q/k/v biases; Llama's `attention_bias` covers q/k/v and o.
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"),
        dtype=dtype,
        param_dtype=jnp.dtype(param_dtype).name if param_dtype is not None else dtype,
        **runtime,
    )


def config_to_hf(config: ModelConfig, torch_dtype: str) -> dict:
    """Keyword arguments for transformers' Qwen2Config / LlamaConfig."""
    rope = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta}
        rope.update(dataclasses.asdict(config.rope_scaling))
    eos = config.eos_token_id
    kwargs = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters=rope,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(eos) if isinstance(eos, tuple) else eos,
        pad_token_id=config.pad_token_id,
        dtype=torch_dtype,
        architectures=["Qwen2ForCausalLM" if config.model_type == "qwen2" else "LlamaForCausalLM"],
    )
    if config.model_type == "llama":
        if config.qkv_bias != config.o_bias:
            raise ValueError("Llama export needs qkv_bias == o_bias (HF `attention_bias`).")
        kwargs.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    elif not config.qkv_bias or config.o_bias or config.mlp_bias:
        raise ValueError("Qwen2 export needs qkv_bias=True, o_bias=False, mlp_bias=False.")
    return kwargs


# ---------------------------------------------------------------------------
# Tensor name / layout table


@dataclasses.dataclass(frozen=True)
class _Entry:
    hf_name: str
    path: tuple[str | int, ...]  # path in the NNX state
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    hf_shape: tuple[int, ...]
    layer: int | None = None  # index on the stacked layer axis of `path`


def _same(x):
    return x


def _transpose(x):
    return x.T


def weight_table(config: ModelConfig) -> list[_Entry]:
    """Every checkpoint tensor: HF name, our state path, layout converters, HF shape."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    h, k, dh = config.num_heads, config.num_kv_heads, config.head_dim
    entries = [_Entry("model.embed_tokens.weight", ("embed",), _same, _same, (v, d))]
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."

        def entry(hf_name, path, to_ours, to_hf, shape, i=i):
            # Every layer's tensor is slice i of one stacked parameter ("layers" axis).
            entries.append(_Entry(hf_name, ("layers", *path), to_ours, to_hf, shape, layer=i))

        for hf, name, heads in (("q_proj", "q", h), ("k_proj", "k", k), ("v_proj", "v", k)):
            entry(
                f"{pre}self_attn.{hf}.weight",
                ("attn", f"{name}_kernel"),
                lambda w, n=heads: w.T.reshape(d, n, dh),
                lambda w, n=heads: w.reshape(d, n * dh).T,
                (heads * dh, d),
            )
            if config.qkv_bias:
                entry(
                    f"{pre}self_attn.{hf}.bias",
                    ("attn", f"{name}_bias"),
                    lambda b, n=heads: b.reshape(n, dh),
                    lambda b, n=heads: b.reshape(n * dh),
                    (heads * dh,),
                )
        entry(
            pre + "self_attn.o_proj.weight",
            ("attn", "o_kernel"),
            lambda w: w.T.reshape(h, dh, d),
            lambda w: w.reshape(h * dh, d).T,
            (d, h * dh),
        )
        if config.o_bias:
            entry(pre + "self_attn.o_proj.bias", ("attn", "o_bias"), _same, _same, (d,))
        for name, shape in (("gate", (f, d)), ("up", (f, d)), ("down", (d, f))):
            entry(
                f"{pre}mlp.{name}_proj.weight",
                ("mlp", f"{name}_kernel"),
                _transpose,
                _transpose,
                shape,
            )
            if config.mlp_bias:
                entry(
                    f"{pre}mlp.{name}_proj.bias", ("mlp", f"{name}_bias"), _same, _same, shape[:1]
                )
        for hf, norm in (
            ("input_layernorm", "input_norm"),
            ("post_attention_layernorm", "post_attn_norm"),
        ):
            entry(pre + hf + ".weight", (norm, "scale"), _same, _same, (d,))
    entries.append(_Entry("model.norm.weight", ("final_norm", "scale"), _same, _same, (d,)))
    if not config.tie_word_embeddings:
        entries.append(_Entry("lm_head.weight", ("lm_head",), _transpose, _transpose, (v, d)))
    return entries


# ---------------------------------------------------------------------------
# Import


def _at(state: nnx.State, path: tuple[str | int, ...]):
    for key in path:
        state = state[key]
    return state


def _checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> safetensors file, for single-file and sharded checkpoints."""
    index = path / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / file for name, file in weight_map.items()}
    single = path / SAFE_SINGLE
    if single.exists():
        with safe_open(single, framework="numpy") as f:
            return dict.fromkeys(f.keys(), single)
    raise FileNotFoundError(f"{path}: neither {SAFE_INDEX} nor {SAFE_SINGLE} found.")


def read_hf_config(path: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint directory."""
    config_file = Path(path) / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{path}: no config.json (is this a Hugging Face checkpoint?).")
    return json.loads(config_file.read_text())


def abstract_hf_model(
    path: str | os.PathLike, dtype=jnp.float32, *, param_dtype=None, **runtime: Any
) -> Transformer:
    """The `Transformer` of a checkpoint's config.json with abstract (shape-only) weights.

    No tensor is read: `jax.ShapeDtypeStruct` leaves, for building shardings or
    restoring a checkpoint straight onto them. Arguments as in `load_hf_checkpoint`.
    """
    config = config_from_hf(read_hf_config(path), dtype=dtype, param_dtype=param_dtype, **runtime)
    return nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))


def _stack(slices: list[jax.Array], sharding) -> jax.Array:
    """One stacked [Ly, ...] parameter from its per-layer slices, straight onto `sharding`."""
    return jax.jit(lambda *xs: jnp.stack(xs), out_shardings=sharding)(*slices)


def load_hf_checkpoint(
    path: str | os.PathLike,
    dtype=jnp.float32,
    *,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules=sharding_lib.LOGICAL_RULES,
    adapter_seed: int = 0,
    **runtime: Any,
) -> Transformer:
    """Load a Qwen2 / Llama-3 Hugging Face checkpoint directory as an NNX `Transformer`.

    Tensors are read one at a time (bf16 included), converted to our layout and
    `param_dtype` (default: `dtype`), and placed straight onto their device or,
    with `mesh`, their sharding — the host never holds two full copies. A layer's
    tensor goes onto the devices as its slice of the stacked parameter; the slices
    are stacked on the devices once every layer's is there. `runtime`: `remat`,
    `attention`, `attention_block`, `scan_unroll` and the `lora_*` fields (see
    `ModelConfig`). With LoRA the checkpoint is the frozen base (in the compute dtype, or
    quantized to nf4 slice by slice as it arrives) and the adapters start fresh from
    `adapter_seed` (B = 0: the model computes the base exactly).

    Raises:
      ValueError: unsupported model_type or rope type, a missing, unexpected or
        wrongly shaped tensor (the message names the tensor).
    """
    path = Path(path)
    abstract = abstract_hf_model(path, dtype, param_dtype=param_dtype, **runtime)
    config = abstract.config
    graphdef, state = nnx.split(abstract)
    shardings = sharding_lib.state_shardings(state, mesh, rules) if mesh is not None else None

    files = _checkpoint_files(path)
    table = {e.hf_name: e for e in weight_table(config)}
    missing = sorted(set(table) - set(files))
    if missing:
        raise ValueError(f"{path}: checkpoint is missing tensor(s) {missing[:8]}.")
    extra = sorted(n for n in set(files) - set(table) if not n.endswith(_IGNORED_SUFFIXES))
    if config.tie_word_embeddings and "lm_head.weight" in extra:
        logger.warning("%s: ignoring lm_head.weight, the embeddings are tied.", path)
        extra.remove("lm_head.weight")
    if extra:
        raise ValueError(f"{path}: checkpoint has unexpected tensor(s) {extra[:8]}.")

    by_file: dict[Path, list[_Entry]] = {}
    for entry in table.values():
        by_file.setdefault(files[entry.hf_name], []).append(entry)
    layer_slices: dict[tuple, dict[int, jax.Array]] = {}
    for file, entries in by_file.items():
        with safe_open(file, framework="numpy") as f:
            for entry in entries:
                tensor = f.get_tensor(entry.hf_name)
                if tuple(tensor.shape) != entry.hf_shape:
                    raise ValueError(
                        f"{path}: tensor {entry.hf_name} has shape {tuple(tensor.shape)}, "
                        f"expected {entry.hf_shape} from config.json."
                    )
                variable = _at(state, entry.path)
                scale = _scale_of(state, entry.path)  # nf4: read as floats, quantized below
                dtype = variable.value.dtype if scale is None else config.compute_dtype
                value = np.ascontiguousarray(entry.to_ours(tensor.astype(dtype)))
                target = _at(shardings, entry.path).value if shardings is not None else None
                if entry.layer is None:
                    variable.value = jax.device_put(value, target)
                else:
                    if target is not None:  # the slice's sharding: the stacked one minus "layers"
                        target = NamedSharding(target.mesh, PartitionSpec(*target.spec[1:]))
                    slices = layer_slices.setdefault(entry.path, {})
                    slices[entry.layer] = jax.device_put(value, target)
                    if len(slices) == config.num_layers:
                        target = _at(shardings, entry.path).value if shardings is not None else None
                        ordered = [slices[i] for i in range(config.num_layers)]
                        if scale is not None:  # QLoRA: codes and scales from the slices
                            scale_target = (
                                _at(shardings, entry.path[:-1])[f"{entry.path[-1]}_scale"].value
                                if shardings is not None
                                else None
                            )
                            variable.value, scale.value = _stack_quantized(
                                ordered, config.lora_tile_size, (target, scale_target)
                            )
                        else:
                            variable.value = _stack(ordered, target)
                        del layer_slices[entry.path], ordered, slices
                del tensor, value
    if config.lora_rank:
        adapters = nnx.filter_state(state, nnx.LoRAParam)
        targets = nnx.filter_state(shardings, nnx.LoRAParam) if shardings is not None else None
        fresh = lora_lib.initial_adapters(adapters, adapter_seed, targets)
        state = nnx.merge_state(state, fresh)
    return nnx.merge(graphdef, state)


def _scale_of(state: nnx.State, path: tuple[str | int, ...]):
    """The nf4 scale variable beside kernel `path`, or None when it is stored as it is."""
    parent = _at(state, path[:-1])
    return parent[f"{path[-1]}_scale"] if f"{path[-1]}_scale" in parent else None


def _stack_quantized(slices: list[jax.Array], tile: int, shardings) -> tuple[jax.Array, jax.Array]:
    """(nf4 codes, scales) of one stacked kernel from its per-layer slices."""

    def stack(*xs):
        q = lora_lib.quantize(jnp.stack(xs), tile)
        return q.qvalue, q.scale

    return jax.jit(stack, out_shardings=shardings)(*slices)


# ---------------------------------------------------------------------------
# Export


def _iter_hf_tensors(model: Transformer, dtype) -> Iterator[tuple[str, np.ndarray]]:
    state = nnx.state(model, nnx.Param)
    for entry in weight_table(model.config):
        value = _at(state, entry.path).value
        if entry.layer is not None:
            value = value[entry.layer]
        value = np.asarray(jax.device_get(value))
        yield entry.hf_name, np.ascontiguousarray(entry.to_hf(value).astype(dtype))


def _save_shard(tensors: dict[str, np.ndarray], file: Path) -> None:
    """`safetensors` `save_file`, leaving `file` with the mode a file made by `open()` gets.

    safetensors makes its files private (mode 0600). An empty file created first gets the
    mode the process's umask gives (read without changing the umask), which is then applied.
    """
    file.touch()
    mode = stat.S_IMODE(file.stat().st_mode)
    save_file(tensors, file, metadata={"format": "pt"})
    file.chmod(mode)


def save_hf_checkpoint(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_size: int = 5 * 1024**3,
) -> None:
    """Write config.json + safetensors that `transformers.AutoModelForCausalLM` loads.

    A LoRA model is written merged (`models.merged`: W + A B · alpha / r, nf4 codes
    dequantized), as the plain checkpoint transformers loads; `save_peft_adapters` writes
    the adapters alone.

    Args:
      model: the model to export.
      path: output directory (created).
      dtype: tensor dtype on disk (default: the model's `param_dtype`).
      max_shard_size: bytes per safetensors file; above it the checkpoint is
        sharded with a `model.safetensors.index.json`, as transformers does.
    """
    import transformers  # deferred: only export needs it

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = lora_lib.merged(model)
    dtype = jnp.dtype(model.config.param_dtype if dtype is None else dtype)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[dtype.name]
    config_cls = (
        transformers.Qwen2Config if model.config.model_type == "qwen2" else transformers.LlamaConfig
    )
    config_cls(**config_to_hf(model.config, torch_dtype)).save_pretrained(path)

    # Group tensors into shards without materialising more than one shard.
    shards: list[list[str]] = [[]]
    sizes = [0]
    for entry in weight_table(model.config):
        nbytes = int(np.prod(entry.hf_shape)) * dtype.itemsize
        if shards[-1] and sizes[-1] + nbytes > max_shard_size:
            shards.append([])
            sizes.append(0)
        shards[-1].append(entry.hf_name)
        sizes[-1] += nbytes
    for stale in [*path.glob("model*.safetensors"), path / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    tensors = _iter_hf_tensors(model, dtype)
    names = (
        [SAFE_SINGLE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for file, shard in zip(names, shards, strict=True):
        chunk = dict(next(tensors) for _ in shard)
        _save_shard(chunk, path / file)
        weight_map.update(dict.fromkeys(chunk, file))
        del chunk
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
        (path / SAFE_INDEX).write_text(json.dumps(index, indent=2))


def _hf_modules(config: ModelConfig) -> dict[str, str]:
    """Our projection path ("layers/attn/q_kernel") → its Hugging Face module in a layer
    ("self_attn.q_proj"), read off `weight_table`."""
    prefix = "model.layers.0."
    return {
        "/".join(e.path): e.hf_name.removeprefix(prefix).removesuffix(".weight")
        for e in weight_table(config)
        if e.layer == 0 and "/".join(e.path) in lora_lib.PROJECTIONS
    }


def save_peft_adapters(
    model: Transformer, path: str | os.PathLike, base_model: str | os.PathLike = ""
) -> None:
    """Write a LoRA model's adapters alone as PEFT does: `adapter_model.safetensors` (fp32
    `base_model.model.model.layers.{i}.<module>.lora_A.weight` [r, in] and `lora_B.weight`
    [out, r]) and `adapter_config.json` (r, lora_alpha, target_modules, the base model).

    PEFT adds B A · lora_alpha / r to each targeted weight [out, in], which is our
    x A B · alpha / r; inputs and outputs are flattened in the checkpoint's order.

    Raises:
      ValueError: the model has no adapters.
    """
    config = model.config
    if not config.lora_rank:
        raise ValueError("save_peft_adapters: the model has no adapters (lora_rank is 0).")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = nnx.state(model, nnx.LoRAParam)
    modules = _hf_modules(config)
    tensors = {}
    for target in config.lora_paths:
        keys = target.split("/")
        module = _at(state, keys[:-1])
        a = np.asarray(jax.device_get(module[f"{keys[-1]}_lora_a"].value), np.float32)
        b = np.asarray(jax.device_get(module[f"{keys[-1]}_lora_b"].value), np.float32)
        for i in range(config.num_layers):
            name = f"base_model.model.model.layers.{i}.{modules[target]}"
            tensors[f"{name}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{name}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    _save_shard(tensors, path / "adapter_model.safetensors")
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model),
        "r": config.lora_rank,
        "lora_alpha": config.lora_alpha or config.lora_rank,
        "lora_dropout": 0.0,
        "target_modules": sorted({modules[t].split(".")[-1] for t in config.lora_paths}),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
