"""Low-rank adapters (LoRA) on the stacked projections, and the nf4-quantized frozen base (QLoRA).

A targeted projection W [in, out] gains two `nnx.LoRAParam`s stacked on the layer axis
like the weights, `{name}_lora_a` [Ly, in, r] (He-uniform, as qwix's `LoraRule`) and
`{name}_lora_b` [Ly, r, out] (zeros), and computes

    y = x W + (x A) B · alpha / r

so freshly initialised adapters give the base model's outputs exactly, and a reference
"with the adapters off" is the same model with every B zeroed (`adapters_off`). With
`ModelConfig.lora_base_qtype = "nf4"` each targeted W is stored as qwix's nf4 codes
(`{name}` holds uint4 [Ly, in..., out...]) and a scale per `lora_tile_size` inputs per
output (`{name}_scale`), dequantized layer by layer inside the forward's layer scan.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import qwix
from flax import nnx
from jax.nn import initializers
from qwix._src.core.qarray import QArray

# Every projection an adapter can target: module path → (input axes, output axes) of its
# kernel after the layer axis. Paths are what `ModelConfig.lora_targets` matches.
PROJECTIONS = {
    "layers/attn/q_kernel": 1,
    "layers/attn/k_kernel": 1,
    "layers/attn/v_kernel": 1,
    "layers/attn/o_kernel": 2,
    "layers/mlp/gate_kernel": 1,
    "layers/mlp/up_kernel": 1,
    "layers/mlp/down_kernel": 1,
}
# The attention and MLP projections (what Tunix, PEFT's "all-linear" and the QLoRA paper adapt).
DEFAULT_TARGETS = r"layers/(attn|mlp)/.*_kernel"
BASE_QTYPES = ("", "nf4")
# The stated tolerance of an nf4 base's forward against its float weights, per token: the
# mean KL(float ‖ nf4) of the next-token distributions (nats) and the share of tokens whose
# most likely next token is unchanged. The trained quickstart model (fp32, the default tile
# of 64) measures 0.023 nats and 96.7%.
NF4_MAX_KL = 0.05
NF4_MIN_TOP1_AGREEMENT = 0.9


def targeted(pattern: str) -> tuple[str, ...]:
    """The projection paths `pattern` matches in full (`re.fullmatch`), in `PROJECTIONS` order.

    Raises:
      ValueError: the pattern is not a regex or matches none of them (both named).
    """
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"model.lora_targets={pattern!r} is not a regular expression: {e}") from e
    paths = tuple(p for p in PROJECTIONS if regex.fullmatch(p))
    if not paths:
        raise ValueError(
            f"model.lora_targets={pattern!r} matches no projection; the projections are "
            f"{list(PROJECTIONS)}."
        )
    return paths


def add_adapters(module: nnx.Module, prefix: str, config, rngs: nnx.Rngs, stack: int) -> None:
    """Give `module` (at path `prefix`, e.g. "layers/attn") an adapter pair per targeted kernel.

    Shapes are the flattened [Ly, in, r] / [Ly, r, out] that qwix gives a dot's weight;
    adapters are stored in `param_dtype` (the trained masters).
    """
    if not config.lora_rank:
        return
    r, dtype = config.lora_rank, config.weight_dtype
    for path in config.lora_paths:
        parent, name = path.rsplit("/", 1)
        if parent != prefix:
            continue
        kernel = getattr(module, name)
        shape = kernel.value.shape[1:]  # after the layer axis (nf4 codes too)
        n_in = PROJECTIONS[path]
        # Split like the kernel's first input and first output axis (as qwix does).
        axes = kernel.get_metadata().get("logical_axes") or (None,) * (len(shape) + 1)
        a_axes, b_axes = ("layers", axes[1], None), ("layers", None, axes[1 + n_in])
        fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        a = _stacked_a(rngs.params(), (stack, fan_in, r), dtype)
        setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, logical_axes=a_axes))
        b = jnp.zeros((stack, r, fan_out), dtype)
        setattr(module, f"{name}_lora_b", nnx.LoRAParam(b, logical_axes=b_axes))


def _stacked_a(key: jax.Array, shape: tuple[int, int, int], dtype) -> jax.Array:
    """A fresh A [Ly, in, r]: each layer's He-uniform (fan-in = in) from its own key."""
    layer_keys = jax.random.split(key, shape[0])
    draw = initializers.he_uniform()
    return jax.vmap(lambda k: draw(k, shape[1:], jnp.float32))(layer_keys).astype(dtype)


def initial_adapters(adapters: nnx.State, seed: int, shardings: nnx.State | None = None):
    """Fresh adapters shaped like `adapters` (abstract ok): every A He-uniform from `seed`,
    every B zero; straight onto `shardings` (a state of NamedShardings) when given."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(adapters)

    def make(path, leaf, key):
        if _is_b(path):
            return jnp.zeros(leaf.shape, leaf.dtype)
        return _stacked_a(key, leaf.shape, leaf.dtype)

    def build():
        keys = jax.random.split(jax.random.key(seed), len(leaves))
        made = [make(p, x, keys[i]) for i, (p, x) in enumerate(leaves)]
        return jax.tree_util.tree_unflatten(treedef, made)

    out_shardings = None if shardings is None else jax.tree.leaves(shardings)
    if out_shardings is not None:
        out_shardings = jax.tree_util.tree_unflatten(treedef, out_shardings)
    return jax.jit(build, out_shardings=out_shardings)()


def quantize_base(module: nnx.Module, prefix: str, config) -> None:
    """Store `module`'s projection kernels (at path `prefix`) as nf4 codes and scales, when
    `config.lora_base_qtype` says so."""
    if config.lora_base_qtype != "nf4":
        return
    for path in PROJECTIONS:
        parent, name = path.rsplit("/", 1)
        if parent != prefix:
            continue
        variable = getattr(module, name)
        axes = variable.get_metadata().get("logical_axes")
        q = quantize(variable.value, config.lora_tile_size)
        setattr(module, name, nnx.Param(q.qvalue, logical_axes=axes))
        scale_axes = None if axes is None else (axes[0], None, *axes[2:])
        setattr(module, f"{name}_scale", nnx.Param(q.scale, logical_axes=scale_axes))


def quantize(kernel: jax.Array, tile: int, scale_dtype=jnp.float32) -> QArray:
    """qwix nf4 codes of a stacked kernel [Ly, in, out...]: one scale per `tile` inputs (the
    contraction axis 1) per layer and output, as QLoRA's blockwise absmax."""
    axes = tuple(i for i in range(kernel.ndim) if i != 1)
    tile = min(tile, kernel.shape[1])
    return qwix.quantize(
        kernel, "nf4", channelwise_axes=axes, tiled_axes={1: tile}, scale_dtype=scale_dtype
    )


def weight(module: nnx.Module, name: str, dtype) -> jax.Array:
    """Kernel `name` of `module` in `dtype`: the stored weight, or its nf4 codes dequantized."""
    scale = getattr(module, f"{name}_scale", None)
    return _float_kernel(getattr(module, name).value, None if scale is None else scale.value, dtype)


def _float_kernel(stored: jax.Array, scale: jax.Array | None, dtype) -> jax.Array:
    """A stored kernel in `dtype`: as it is, or (with its nf4 `scale`) dequantized."""
    if scale is None:
        return stored.astype(dtype)
    return qwix.dequantize(QArray(stored, scale.astype(dtype), None, "nf4")).astype(dtype)


def project(module: nnx.Module, x: jax.Array, name: str, n_in: int = 1) -> jax.Array:
    """x[..., in...] @ kernel `name` [in..., out...] plus its adapter's scaled x A B, if any."""
    from aapo_jax.models.transformer import dense  # the model's one matmul helper

    y = dense(x, weight(module, name, x.dtype), n_in)
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return y
    config = module.config
    a = a.value.astype(x.dtype).reshape(*x.shape[x.ndim - n_in :], -1)
    xa = dense(x, a, n_in)
    delta = dense(xa, getattr(module, f"{name}_lora_b").value.astype(x.dtype))
    return y + (delta * jnp.asarray(config.lora_scale, x.dtype)).reshape(y.shape)


def adapters_off(adapters: nnx.State) -> nnx.State:
    """The adapters with every B zeroed: the model then computes its base exactly (x A 0 = 0)."""

    def off(path, leaf):
        return jnp.zeros_like(leaf) if _is_b(path) else leaf

    return jax.tree_util.tree_map_with_path(off, adapters)


def _is_b(path) -> bool:
    return any(str(getattr(k, "key", "")).endswith("_lora_b") for k in path)


def merged_kernel(module_state, name: str, config) -> jax.Array:
    """fp32 W + A B · alpha / r of kernel `name` ([Ly, in..., out...]) from a module's state
    (a dict of Variables): the weight a merged export writes."""
    scale = module_state[f"{name}_scale"].value if f"{name}_scale" in module_state else None
    w = _float_kernel(module_state[name].value, scale, jnp.float32)
    if f"{name}_lora_a" not in module_state:
        return w
    a = module_state[f"{name}_lora_a"].value.astype(jnp.float32)
    b = module_state[f"{name}_lora_b"].value.astype(jnp.float32)
    delta = jnp.einsum("lir,lro->lio", a, b, precision=jax.lax.Precision.HIGHEST)
    return w + (delta * config.lora_scale).reshape(w.shape)


def split_trained(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State | None]:
    """(graphdef, trained, frozen): without LoRA every weight trains (frozen is None); with
    it the adapters train and the base is frozen. `nnx.merge(graphdef, trained, frozen)`
    (or `(graphdef, trained)`) gives the model back."""
    if not model.config.lora_rank:
        graphdef, state = nnx.split(model)
        return graphdef, state, None
    return nnx.split(model, nnx.LoRAParam, ...)


def merged(model: nnx.Module) -> nnx.Module:
    """A plain model (no adapters, no nf4) computing W + A B · alpha / r in `param_dtype`:
    what a merged export writes. The model itself when it has no adapters or codes."""
    from aapo_jax.models.transformer import Transformer

    config = model.config
    if not config.lora_rank:
        return model
    plain = config.replace(lora_rank=0, lora_base_qtype="")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(plain, rngs=nnx.Rngs(0))))
    state = nnx.state(model)
    dtype = plain.weight_dtype

    def fill(path, variable):
        keys = tuple(str(getattr(k, "key", k)) for k in path)
        if "/".join(keys) in PROJECTIONS:
            module = state
            for key in keys[:-1]:
                module = module[key]
            value = merged_kernel(module, keys[-1], config)
        else:
            value = _at(state, keys).value
        return variable.replace(jnp.asarray(value).astype(dtype))

    filled = jax.tree_util.tree_map_with_path(
        fill, abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
    return nnx.merge(graphdef, filled)


def _at(state, keys):
    for key in keys:
        state = state[key]
    return state
