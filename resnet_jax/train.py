"""Training and evaluation: `train_and_evaluate(config, workdir)` and its compiled steps.

One `jax.jit`-compiled step over a 1-D `data` mesh: parameters, BN statistics and
optimizer state replicated, the batch split over the devices, the state donated. Where
the batch comes from is the only difference between the two kinds of data:
- the small datasets of the paper's CIFAR experiments live on the devices; each step
  gathers, normalises and augments its own batch (see `data/memory.py`), optionally
  several steps per dispatch with `lax.scan`;
- large datasets (ImageNet) are decoded and augmented by a host pipeline, and each step
  receives its batch, already split over the devices (see `data/stream.py`).
Either way a step is called as `step(state, inputs=..., key=...)`, `inputs` being one
value of its kind: the split (`memory.DeviceData`) or the batch and its normalisation
(`stream.StreamedBatch`); an eval step as `eval_step(variables, inputs)`, compiled before
the first step (`compile_ahead`) for inputs like `inputs.eval_inputs_like(mode)`.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath

from resnet_jax import backend, checkpoint, compile_cache, integrity, schedules, scoring
from resnet_jax import config as config_lib
from resnet_jax.complexity import count_macs, count_params
from resnet_jax.data import dali, memory, stream
from resnet_jax.data.augment import normalization_stats
from resnet_jax.data.image_records import STREAMED_DATASETS
from resnet_jax.data.sources import load_split
from resnet_jax.metrics import MetricWriter, Progress, classification_metrics
from resnet_jax.models import ResNet
from resnet_jax.parallel import Parallel, barrier, data_parallel, eval_batch_size_for
from resnet_jax.preemption import PreemptionWatcher
from resnet_jax.state import TrainState, abstract_train_state, build_model, init_state, input_shape
from resnet_jax.workdir import check_reachable, is_object_storage, workdir_path

# What a step of each kind of data receives as `inputs`.
TrainInputs = memory.DeviceData | stream.StreamedBatch
EvalInputs = memory.EvalBatchIndex | stream.StreamedBatch


def make_train_step(
    config: ml_collections.ConfigDict, model: ResNet, parallel: Parallel
) -> Callable[[TrainState, memory.DeviceData, jax.Array], tuple[TrainState, dict]]:
    """`step(state, inputs, key) -> (state, metrics)` for a dataset on the devices: `inputs`
    is the training split (`memory.DeviceData`), from which each of `steps_per_dispatch`
    SGD steps draws its batch with `key` (see `_compile_train_step`)."""

    def batch_of(data: memory.DeviceData, step: jax.Array, key: jax.Array):
        return memory.train_batch(
            data, step, key, config.batch_size, config.dataset.augment, config.dataset.crop_padding
        )

    return _compile_train_step(config, model, parallel, batch_of)


def make_stream_train_step(
    config: ml_collections.ConfigDict, model: ResNet, parallel: Parallel
) -> Callable[[TrainState, stream.StreamedBatch, jax.Array], tuple[TrainState, dict]]:
    """`step(state, inputs, key) -> (state, metrics)` for a streamed dataset: one SGD step
    on `inputs`, the host pipeline's batch and its normalisation (`stream.StreamedBatch`);
    the key is unused: the host augmented the batch."""
    def batch_of(inputs: stream.StreamedBatch, step: jax.Array, key: jax.Array):
        return stream.train_images(inputs)

    return _compile_train_step(config, model, parallel, batch_of)


def _compile_train_step(config: ml_collections.ConfigDict, model: ResNet, parallel: Parallel,
                        batch_of: Callable[..., tuple[jnp.ndarray, jnp.ndarray]]):
    """`step(state, inputs, key) -> (state, metrics)`: `steps_per_dispatch` SGD steps, each
    on the batch `batch_of(inputs, step, key)` gives, as (images, labels).

    metrics: summed over the steps, "loss" (of the per-step mean losses) and "errors"
    (misclassified training examples), for the host to average; "finite" (loss and
    parameters of every step), and if not, the first step where they were not.
    """
    tx = schedules.optimizer(config)
    schedule = schedules.learning_rate_schedule(config)

    def one_step(state: TrainState, inputs: TrainInputs, key: jax.Array):
        images, labels = batch_of(inputs, state.step, key)
        images = jax.lax.with_sharding_constraint(images, parallel.batch)
        labels = jax.lax.with_sharding_constraint(labels, parallel.batch)

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            targets = optax.smooth_labels(
                jax.nn.one_hot(labels, logits.shape[-1]), config.label_smoothing
            )
            loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets).mean()
            return loss, (logits, updates["batch_stats"])

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        opt_state = schedules.with_learning_rate(state.opt_state, schedule(state.step, state.lr_warmup_end))
        updates, opt_state = tx.update(grads, opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        params_finite = jnp.all(jnp.stack([
            jnp.all(jnp.isfinite(p)) for p in jax.tree_util.tree_leaves(new_state.params)
        ]))
        return new_state, {
            "loss": loss,
            "errors": jnp.sum(jnp.argmax(logits, -1) != labels),
            "loss_finite": jnp.isfinite(loss),
            "params_finite": params_finite,
            "step": new_state.step,
        }

    def step(state: TrainState, inputs: TrainInputs, key: jax.Array):
        if config.steps_per_dispatch == 1:
            # Not a one-step scan: XLA:CPU leaves the gradient convolutions inside a loop
            # body in a slow generic form (measured in benchmarks/RESULTS.md).
            state, metrics = one_step(state, inputs, key)
            per_step = jax.tree_util.tree_map(lambda value: value[None], metrics)
        else:
            state, per_step = jax.lax.scan(
                lambda s, _: one_step(s, inputs, key), state, length=config.steps_per_dispatch
            )
        finite = per_step["loss_finite"] & per_step["params_finite"]
        first_bad = jnp.argmin(finite)  # the first False, if any
        return state, {
            "loss": jnp.sum(per_step["loss"]),
            "errors": jnp.sum(per_step["errors"]),
            "finite": jnp.all(finite),
            "first_nonfinite_step": per_step["step"][first_bad],
            "first_nonfinite_loss": ~per_step["loss_finite"][first_bad],
        }

    # keep_unused: the learning rate in opt_state is overwritten before it is read, and an
    # unread argument would be dropped from the program, escaping donation with it.
    return jax.jit(
        step, donate_argnums=0, out_shardings=parallel.replicated, keep_unused=True,
        compiler_options=backend.compiler_options(config.model.conv),
    )


def make_eval_step(config: ml_collections.ConfigDict, model: ResNet, parallel: Parallel, batch_size: int):
    """`eval_step(variables, inputs) -> sums` over one batch (of `batch_size` examples) of a
    dataset on the devices, `inputs` naming it (`memory.EvalBatchIndex`); padding masked."""
    def batch_of(inputs: memory.EvalBatchIndex):
        return memory.eval_batch(inputs.data, inputs.index, batch_size)

    return _compile_eval_step(config, model, parallel, batch_of, "center")


def make_stream_eval_step(config: ml_collections.ConfigDict, model: ResNet, parallel: Parallel,
                          mode: str = "center", average: str = "scores"):
    """`eval_step(variables, inputs) -> sums` over a streamed batch of `mode` views
    (`scoring.MODES`; multi-scale's `average`: `scoring.AVERAGES`) and its normalisation
    (`stream.StreamedBatch`), padding masked. Multi-scale compiles once per canvas bucket
    met (`augment.MULTI_SCALE_BUCKETS`)."""
    return _compile_eval_step(config, model, parallel, stream.eval_views, mode, average)


def _compile_eval_step(config: ml_collections.ConfigDict, model: ResNet, parallel: Parallel,
                       batch_of: Callable, mode: str, average: str = "scores"):
    def eval_step(variables: dict, inputs: EvalInputs):
        views, labels, mask = batch_of(inputs)
        views = jax.tree_util.tree_map(lambda v: jax.lax.with_sharding_constraint(v, parallel.batch), views)
        scores = scoring.class_scores(model, variables, views, mode, average)
        return classification_metrics(scores, labels, mask)

    return jax.jit(
        eval_step, out_shardings=parallel.replicated,
        compiler_options=backend.compiler_options(config.model.conv),
    )


def memory_eval_inputs(data: memory.DeviceData, batch_size: int,
                       parallel: Parallel) -> list[memory.EvalBatchIndex]:
    """The eval step's inputs for every batch of a dataset on the devices (each index
    replicated, as the compiled step expects)."""
    put = lambda index: jax.make_array_from_process_local_data(parallel.replicated, np.int32(index))  # noqa: E731
    return [memory.EvalBatchIndex(data, put(index))
            for index in range(memory.num_eval_batches(data, batch_size))]


def compile_ahead(step, name: str, announce: bool, *args):
    """The jitted `step` compiled now for arguments like `args` (arrays or
    `jax.ShapeDtypeStruct`s, shardings included), so that its compile time and any compile
    error come before the run rather than at its first use; called positionally."""
    if announce:
        print(f"compiling the {name} ...", flush=True)
    start = time.perf_counter()
    compiled = step.lower(*args).compile()
    if announce:
        print(f"compiled the {name} in {time.perf_counter() - start:.1f} s", flush=True)
    return compiled


def compiled_with_first_batch(train_step, batches: Iterator, announce: bool, state: TrainState, inputs_like,
                              key: jax.Array):
    """(the training step compiled for inputs like `inputs_like`, the first of `batches`):
    the step compiles here while a thread takes the first batch, which starts the input
    workers (seconds to minutes each: they overlap). A compile error comes once that batch
    has (the thread is not left running); a pipeline error comes as it is."""
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="first-batch") as fetching:
        first = fetching.submit(next, batches)
        compiled = compile_ahead(train_step, "training step", announce, state, inputs_like, key)
        return compiled, first.result()


def eval_metrics(eval_step, variables: dict, batches: Iterable) -> dict[str, float]:
    """Loss, top-1 and top-5 error over every example of `batches` (the eval step's
    inputs), each scored once."""
    totals = {"loss": 0.0, "errors": 0, "top5_errors": 0, "count": 0}
    for inputs in batches:
        sums = jax.device_get(eval_step(variables, inputs))
        for name in totals:
            totals[name] += sums[name].item()
    count = totals["count"]
    return {
        "loss": totals["loss"] / count,
        "error": totals["errors"] / count,
        "top5_error": totals["top5_errors"] / count,
        "num_examples": count,
    }


def load_data(config: ml_collections.ConfigDict, parallel: Parallel, splits: tuple[str, ...]):
    """The config's splits (by role: "train", "eval") on the devices, normalised with the
    training split's statistics; read and checked before anything is compiled."""
    data_dir = config.dataset.data_dir or None
    train = load_split(config.dataset.name, config.dataset.train_split, data_dir)
    mean, std = normalization_stats(train.images, config.dataset.normalization)
    loaded = {}
    for role in splits:
        if role == "train":
            memory.check_batch_fits(train, config.batch_size, config.dataset.train_split)
            split = train
        else:
            split = load_split(config.dataset.name, config.dataset.eval_split, data_dir)
        loaded[role] = memory.put_on_devices(split, mean, std, parallel.replicated)
    return loaded


class DeviceInputs:
    """A small dataset held on the devices: every step gets the same split to draw from."""

    num_classes = None  # known from the dataset's name

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel, roles: tuple[str, ...]):
        self.config, self.parallel = config, parallel
        self.data = load_data(config, parallel, roles)
        if "eval" in roles:
            self.eval_batch_size = eval_batch_size_for(
                config.eval_batch_size, self.data["eval"].num_examples, parallel.num_devices)

    def describe(self) -> str:
        return f"{self.data['train'].num_examples} training / {self.data['eval'].num_examples} eval examples"

    def train_step(self, model: ResNet):
        return make_train_step(self.config, model, self.parallel)

    def eval_step(self, model: ResNet, mode: str, average: str = "scores"):
        return make_eval_step(self.config, model, self.parallel, self.eval_batch_size)

    def eval_inputs_like(self, mode: str) -> memory.EvalBatchIndex:
        index = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.parallel.replicated)
        return memory.EvalBatchIndex(self.data["eval"], index)

    def train_inputs_like(self) -> memory.DeviceData:
        return self.data["train"]

    def train_batches(self, start_step: int):
        return contextlib.nullcontext(itertools.repeat(self.data["train"]))

    def eval_passes(self, mode: str):
        inputs = memory_eval_inputs(self.data["eval"], self.eval_batch_size, self.parallel)
        return contextlib.nullcontext(lambda: iter(inputs))


class StreamInputs:
    """A large dataset streamed by the host pipeline (`dataset.loader`: Grain, or DALI on
    GPU nodes): every step gets its own batch."""

    def __init__(self, config: ml_collections.ConfigDict, parallel: Parallel, roles: tuple[str, ...]):
        self.config, self.parallel = config, parallel
        loader = dali.DaliData if config.dataset.loader == "dali" else stream.StreamedData
        self.data = loader(config, parallel, roles)
        self.num_classes = self.data.num_classes
        if "eval" in roles:
            self.eval_batch_size = self.data.eval_batch_size

    def describe(self) -> str:
        return f"{len(self.data.train)} training / {len(self.data.eval)} eval examples (streamed)"

    def train_step(self, model: ResNet):
        return make_stream_train_step(self.config, model, self.parallel)

    def eval_step(self, model: ResNet, mode: str, average: str = "scores"):
        return make_stream_eval_step(self.config, model, self.parallel, mode, average)

    def eval_inputs_like(self, mode: str) -> stream.StreamedBatch | None:
        return self.data.eval_batch_like(mode)

    def train_inputs_like(self) -> stream.StreamedBatch:
        return stream.train_batch_like(self.config.dataset.image_size, self.config.batch_size, self.parallel,
                                       self.data.normalization)

    def train_batches(self, start_step: int):
        return self.data.train_batches(start_step)

    def eval_passes(self, mode: str):
        return self.data.eval_passes(mode)


def open_inputs(config: ml_collections.ConfigDict, parallel: Parallel, roles: tuple[str, ...]):
    """The config's data, read or opened and checked before anything is compiled."""
    kind = StreamInputs if config.dataset.name in STREAMED_DATASETS else DeviceInputs
    return kind(config, parallel, roles)


def with_dataset_classes(config: ml_collections.ConfigDict, found: int | None) -> ml_collections.ConfigDict:
    """`config` with dataset.num_classes set to the `found` class folders of an image folder
    (so that config.json rebuilds the model without the data); refused if it says otherwise."""
    if found is None or config.dataset.num_classes == found:
        return config
    if config.dataset.num_classes:
        raise config_lib.ConfigError(
            f"config.dataset.num_classes = {config.dataset.num_classes}, but {config.dataset.data_dir} "
            f"has {found} class folders; set it to 0 (the folders decide) or {found}"
        )
    config = config.copy_and_resolve_references()
    config.dataset.num_classes = found
    return config


class TrainingDiverged(RuntimeError):
    """The loss or the parameters stopped being finite; no checkpoint of that state is written."""


def _check_finite(fetched: list[dict]) -> None:
    for metrics in fetched:
        if not metrics["finite"]:
            what = "training loss" if metrics["first_nonfinite_loss"] else "parameters"
            raise TrainingDiverged(
                f"step {int(metrics['first_nonfinite_step'])}: the {what} stopped being finite "
                "(nan or inf); the run stopped without saving that state. Its last checkpoint is "
                "intact; a lower learning_rate or a warm-up (lr_warmup) may help."
            )


def _training_values(fetched: list[dict], config: ml_collections.ConfigDict) -> dict[str, float]:
    """Mean training loss and error over the dispatches of `fetched`."""
    num_steps = len(fetched) * config.steps_per_dispatch
    return {
        "train_loss": sum(m["loss"].item() for m in fetched) / num_steps,
        "train_error": sum(m["errors"].item() for m in fetched) / (num_steps * config.batch_size),
    }


def _restore_or_init(
    config, model, workdir: epath.Path, parallel: Parallel, init_key, allow_config_change: bool
):
    """(start step, state): the newest intact checkpoint's, or a fresh initialisation.

    Everything that could refuse the workdir runs before anything is written to it.
    """
    abstract_state = abstract_train_state(config, model, parallel.replicated)
    # Every process must see the workdir as it was before any of them writes to it.
    barrier("workdir checks begin")
    checkpoint.check_workdir(workdir, config, allow_config_change)
    if (workdir / checkpoint.CHECKPOINT_DIR).exists():
        with checkpoint.manager(workdir, read_only=True) as reader:
            for step in reader.all_steps():
                try:
                    checkpoint.check_compatible(reader, step, abstract_state)
                except checkpoint.DamagedCheckpoint:
                    pass  # set aside below, when resuming; only a misfit must stop us here
    barrier("workdir checks end")
    checkpoint.write_config(workdir, config)
    mngr = checkpoint.manager(workdir, config.keep_checkpoints)
    start, state = checkpoint.restore_latest_intact(workdir, mngr, abstract_state)
    if state is None:
        init = jax.jit(lambda k: init_state(config, model, k), out_shardings=parallel.replicated)
        start, state = 0, init(init_key)
    return mngr, start, state


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike[str], *, allow_config_change: bool = False
) -> dict[str, float]:
    """Train as `config` says, evaluating and checkpointing into `workdir`; resume from the
    newest intact checkpoint there. Returns the last evaluation (eval_loss, eval_error,
    eval_top5_error), or {"preempted_at_step": N} when SIGTERM or Ctrl-C stopped the run
    early (from the start: a signal during set-up or compilation stops after the first step).

    `allow_config_change` lets a workdir of a different config be continued (its old
    config.json is kept beside the new one); its checkpoints must fit the new model.
    `workdir` is a local path or a gs:// URL (see `resnet_jax.workdir`).
    """
    workdir = workdir_path(workdir)  # refuses a workdir it cannot reach before anything runs
    check_reachable(workdir)
    with PreemptionWatcher() as preemption:
        return _train_and_evaluate(config, workdir, allow_config_change, preemption)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path, allow_config_change: bool,
                        preemption: PreemptionWatcher) -> dict[str, float]:
    parallel = data_parallel()
    config_lib.validate(config, parallel.num_devices)
    compile_cache.enable(config.compilation_cache_dir)  # before anything compiles
    inputs = open_inputs(config, parallel, ("train", "eval"))
    config = with_dataset_classes(config, inputs.num_classes)

    model = build_model(config)
    init_key, data_key = jax.random.split(jax.random.key(config.seed))
    mngr, start, state = _restore_or_init(config, model, workdir, parallel, init_key, allow_config_change)
    preemption.watch_checkpoints(mngr)
    train_step = inputs.train_step(model)
    schedule = schedules.learning_rate_schedule(config)
    writer = MetricWriter(workdir, config.tensorboard, note_missing=start == 0)
    writer.drop_after(start)
    progress = Progress(config.num_train_steps)
    warmup_end = int(jax.device_get(state.lr_warmup_end))
    if progress.enabled:
        print(
            f"{config.model.name}: {count_params(state.params):,} parameters, "
            f"{count_macs(model, (1, *input_shape(config))) / 1e6:.1f}M multiply-adds per image; "
            f"{inputs.describe()}; {parallel.num_devices} device(s); "
            + (f"resuming at step {start}" if start else "from scratch"),
            flush=True,
        )

    # Compiled now: a compile error shows before hours of training, and the first
    # evaluation does not stall the run to compile.
    eval_step = compile_ahead(inputs.eval_step(model, "center"), "eval step", progress.enabled,
                              {"params": state.params, "batch_stats": state.batch_stats},
                              inputs.eval_inputs_like("center"))
    integrity.compile_checksums(state)  # likewise for the checkpoints' checksums

    def run_eval() -> dict[str, float]:
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        result = eval_metrics(eval_step, variables, eval_pass())
        return {f"eval_{k}": result[k] for k in ("loss", "error", "top5_error")}

    last_eval: dict[str, float] = {}
    step, pending = start, []
    interval_start, timed_steps = None, 0
    # One eval pipeline for the run: each evaluation is one pass of it.
    with (mngr, writer, inputs.train_batches(start) as train_batches,
          inputs.eval_passes("center") as eval_pass):
        if step < config.num_train_steps:
            train_step, first = compiled_with_first_batch(train_step, train_batches, progress.enabled, state,
                                                          inputs.train_inputs_like(), data_key)
            train_batches = itertools.chain([first], train_batches)
        while step < config.num_train_steps:
            state, metrics = train_step(state, next(train_batches), data_key)
            first_dispatch = interval_start is None
            step += config.steps_per_dispatch
            pending.append(metrics)
            if first_dispatch:
                # The first step warms up (allocations, the input pipeline's buffers): time the
                # steps after it.
                jax.block_until_ready(metrics)
                interval_start = time.perf_counter()
            else:
                timed_steps += config.steps_per_dispatch
            finished = step >= config.num_train_steps
            preempted = preemption.reached(step, mngr)
            logged = step % config.log_every_steps == 0 or finished or preempted
            saving = step % config.checkpoint_every_steps == 0 or finished or preempted
            if first_dispatch and progress.enabled and not logged:  # metrics.jsonl keeps its intervals
                progress.report(step, _training_values(jax.device_get([metrics]), config))
            if logged or saving:
                fetched = jax.device_get(pending)  # waits for the steps: the clock below is right
                _check_finite(fetched)
            if logged:
                elapsed = time.perf_counter() - interval_start
                values = _training_values(fetched, config)
                values["learning_rate"] = float(schedule(step - 1, warmup_end))
                regular_log = step % config.log_every_steps == 0  # not a preemption's or the end's
                if regular_log and schedules.warmup_ends(config, warmup_end, values["train_error"]):
                    warmup_end = values["lr_warmup_end"] = step  # the next step runs at the main rate
                    state = state.replace(lr_warmup_end=jax.make_array_from_process_local_data(
                        parallel.replicated, np.int32(step)))
                    if progress.enabled:
                        print(f"warm-up ended at step {step}: training error {values['train_error']:.3f} < "
                              f"{config.lr_warmup_until_error}; learning rate "
                              f"{float(schedule(step, warmup_end)):.4g} from here", flush=True)
                if timed_steps:
                    values["images_per_sec"] = timed_steps * config.batch_size / elapsed
                writer.write(step, values)
                progress.report(step, values, elapsed / timed_steps if timed_steps else None)
                pending = []
            evaluated = step % config.eval_every_steps == 0 or finished
            if evaluated:
                last_eval = run_eval()
                writer.write(step, last_eval)
                progress.report(step, last_eval)
            if saving:
                writer.flush()  # the lines up to a checkpoint's step are stored before it is
                checkpoint.save(mngr, step, state, last_eval if evaluated else None)
            if preempted:
                checkpoint.wait_until_recorded(mngr)
                print(f"{preemption.stopped_by}: saved the checkpoint of step {step}; rerun the same command "
                      "to resume", flush=True)
                return {"preempted_at_step": step}
            if logged:  # evaluation and saving stay out of the next interval's throughput
                interval_start, timed_steps = time.perf_counter(), 0
        checkpoint.wait_until_recorded(mngr)
        if not last_eval and progress.enabled:
            print(f"step {start}/{config.num_train_steps} was trained before: nothing to train and nothing "
                  "changed; evaluating its checkpoint", flush=True)
        last_eval = last_eval or run_eval()
    if progress.enabled:
        print("\n".join(closing_lines(config, workdir, last_eval)), flush=True)
    return last_eval


def _as_typed(path: str | os.PathLike[str]) -> str:
    """A path as a user would type it here: relative when it is below the current directory
    (a checkout's .venv/bin/python, runs/...), else in full (a gs:// URL as it is)."""
    text = os.fspath(path)
    if is_object_storage(epath.Path(text)):
        return text
    relative = os.path.relpath(text)
    return text if relative.startswith("..") else relative


def closing_lines(config: ml_collections.ConfigDict, workdir: epath.Path,
                  result: dict[str, float]) -> list[str]:
    """What a finished run ends with: its error, where it is, and the commands that
    evaluate, resume and plot it."""
    python, workdir = _as_typed(sys.executable), _as_typed(workdir)
    curves = os.path.join(workdir, "curves.png")  # workdir_path reads a gs:// URL joined so too
    return [
        f"{config.dataset.eval_split} error {result['eval_error']:.2%} after "
        f"{config.num_train_steps:,} steps (top-5 {result['eval_top5_error']:.2%}, "
        f"loss {result['eval_loss']:.4f})",
        f"the run:  {workdir} (config.json, metrics.jsonl, checkpoints/, checkpoint_checksums/)",
        f"evaluate: {python} evaluate.py --workdir={workdir} [--step=best]",
        "resume:   rerun the same command: it continues from the newest checkpoint (a finished run is "
        "reported as here, not trained again)",
        f"plot:     {python} -m resnet_jax.plot {workdir} --out {curves}",
    ]


__all__ = [
    "DeviceInputs", "StreamInputs", "TrainingDiverged", "closing_lines", "compile_ahead", "eval_metrics",
    "load_data", "make_eval_step", "make_stream_eval_step", "make_stream_train_step", "make_train_step",
    "memory_eval_inputs", "open_inputs", "train_and_evaluate", "with_dataset_classes",
]
