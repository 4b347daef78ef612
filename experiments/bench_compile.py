"""Compile seconds of a config's rollout and update at two depths: the scanned layers' claim.

    python -m experiments.bench_compile --config=configs/r1_distill_1p5b_openrs.py \
        --model=deepseek-r1-distill-qwen-1.5b --topology=v5e:2x4
    python -m experiments.bench_compile --config=configs/quickstart.py --cpu_devices=8

The model's config.json is copied with `num_hidden_layers` set to each of `--depths`
(default 4 and the model's own depth) and both programs are compiled exactly as
`experiments/plan.py` compiles them (abstract inputs, no weights), for a TPU topology
through libtpu's compile-only devices or for the local devices. Depths alternate over
`--repeats` rounds, so machine noise hits both alike; the medians and the ratio deepest /
shallowest are printed per program. The layers are one scanned block, so the ratio should
stay near 1 (the Python loop it replaced grew linearly with depth).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from experiments import plan as plan_cli

# --config, --model, --topology, --cpu_devices and --json are experiments/plan.py's flags.
FLAGS = flags.FLAGS
_DEPTHS = flags.DEFINE_list("depths", None, "Layer counts to compile (default: 4,<model's>).")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Rounds over the depths (medians reported).")


def with_depth(model_dir: Path, layers: int, root: Path) -> Path:
    """A copy of model_dir's config.json under root with `num_hidden_layers = layers`."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    hf["num_hidden_layers"] = layers
    out = root / f"layers_{layers}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf))
    return out


def main(argv):
    del argv
    if _REPEATS.value < 1:
        sys.exit(f"error: --repeats must be at least 1, got {_REPEATS.value}")
    if FLAGS.cpu_devices and not FLAGS.topology:  # before anything touches a JAX backend
        from aapo_jax import sharding

        sharding.use_cpu_devices(FLAGS.cpu_devices)
    from aapo_jax import aot

    model_dir = plan_cli.model_path(FLAGS.config, FLAGS.model) or Path(FLAGS.config.model.path)
    own = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    try:
        depths = [int(d) for d in (_DEPTHS.value or [4, own])]
    except ValueError:
        sys.exit(f"error: --depths must be integers, got {_DEPTHS.value}")
    if len(depths) < 2 or min(depths) < 1:
        sys.exit(f"error: --depths needs two or more positive layer counts, got {depths}")
    try:
        devices = aot.target_devices(FLAGS.topology)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    log = lambda message: print(message, file=sys.stderr, flush=True)
    seconds = {d: {"rollout": [], "update": []} for d in depths}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(_REPEATS.value):
            order = depths if round_ % 2 == 0 else depths[::-1]
            for depth in order:
                path = with_depth(model_dir, depth, Path(tmp))
                config = aot.plan_config(FLAGS.config, model_path=path)
                attention = (
                    aot.target_attention(config, devices[0].platform) if FLAGS.topology else None
                )
                plan = aot.abstract_inputs(config, devices, attention=attention)
                log(f"round {round_ + 1}/{_REPEATS.value}: {depth} layers")
                for name, report in aot.compile_programs(plan, log=log).items():
                    if report.error is not None and report.fits is None:
                        sys.exit(f"error: {name} at {depth} layers failed: {report.error}")
                    seconds[depth][name].append(report.compile_s)
    medians = {d: {n: statistics.median(s) for n, s in p.items()} for d, p in seconds.items()}
    shallow, deep = min(depths), max(depths)
    ratio = {n: medians[deep][n] / medians[shallow][n] for n in ("rollout", "update")}
    result = dict(
        config=FLAGS.config.name,
        target=FLAGS.topology or devices[0].platform,
        devices=len(devices),
        compile_s=medians,
        ratio=ratio,
        repeats=_REPEATS.value,
    )
    if FLAGS.json:
        print(json.dumps(result))
        return
    print(f"{result['config']} on {len(devices)} × {devices[0].device_kind} ({result['target']})")
    print(f"{'layers':>8}{'rollout s':>12}{'update s':>12}")
    for d in sorted(depths):
        print(f"{d:>8}{medians[d]['rollout']:>12.1f}{medians[d]['update']:>12.1f}")
    print(
        f"ratio {deep}/{shallow} layers: rollout {ratio['rollout']:.2f}×, "
        f"update {ratio['update']:.2f}× (medians of {_REPEATS.value})"
    )


if __name__ == "__main__":
    app.run(main)
