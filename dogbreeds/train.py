"""Training on Ray Train: a per-worker function around `model.fit`, and the driver that runs
it on N workers with `TensorflowTrainer` (MultiWorkerMirroredStrategy).

    metrics = run_training(DataConfig(data_dir=...), TrainConfig(model="cnn3v2"), "runs/x")

The run directory (names in `runs.py`) receives `config.json`, `model.keras`, `metrics.json`,
`confusions.csv`, `history.json` and `tensorboard/`; Ray keeps a checkpoint each epoch under
`ray/`, and a run whose worker dies resumes from the last one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import tempfile
import threading
import time

from dogbreeds import console, data, evaluate, models, runs, spaces
from dogbreeds.config import DataConfig, TrainConfig, from_dict, to_dict

log = logging.getLogger(__name__)


def build_metrics():
    """The study's metrics: categorical accuracy, precision, recall, and top-5 accuracy."""
    import tf_keras as keras

    return [
        keras.metrics.CategoricalAccuracy(name="accuracy"),
        keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
        keras.metrics.Precision(name="precision"),
        keras.metrics.Recall(name="recall"),
    ]


def compile_model(model, train_config: TrainConfig) -> None:
    """Adam and categorical cross-entropy, as in the study."""
    import tf_keras as keras

    model.compile(
        optimizer=keras.optimizers.Adam(scaled_learning_rate(train_config)),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=train_config.label_smoothing),
        metrics=build_metrics(),
    )


def scaled_learning_rate(train_config: TrainConfig) -> float:
    """The learning rate for the global batch: `learning_rate` times the workers."""
    return train_config.learning_rate * train_config.workers


def build_callbacks(train_config: TrainConfig, log_dir: str) -> list:
    """The study's schedule: early stopping on validation loss keeping the best weights, the
    learning rate lowered on plateau; and TensorBoard logs. With `keep_best_by` another metric
    (a search's), the weights kept are its best epoch's instead."""
    import tf_keras as keras

    by_loss = train_config.keep_best_by == "val_loss"
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=train_config.early_stopping_patience,
            restore_best_weights=by_loss,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=train_config.reduce_lr_factor,
            patience=train_config.reduce_lr_patience,
        ),
        keras.callbacks.TensorBoard(log_dir=log_dir),
    ]
    if train_config.warmup_epochs > 0:
        callbacks.append(_warm_up(scaled_learning_rate(train_config), train_config.warmup_epochs))
    if not by_loss:  # Keras' own keeper of the best weights, told never to stop
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor=train_config.keep_best_by, mode=spaces.METRICS[train_config.keep_best_by],
            patience=train_config.epochs + 1, restore_best_weights=True,
        ))
    return callbacks


def _warm_up(learning_rate: float, epochs: float):
    """A callback raising the learning rate linearly to `learning_rate` over the first `epochs`
    epochs' steps (a resumed run past them is left alone)."""
    import tf_keras as keras

    class WarmUp(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            warmup_steps = epochs * self.params["steps"]
            step = self.epoch * self.params["steps"] + batch + 1
            if step < warmup_steps + 1:
                keras.backend.set_value(self.model.optimizer.learning_rate,
                                        learning_rate * min(1.0, step / warmup_steps))

    return WarmUp()


def train_loop_per_worker(loop_config: dict) -> None:
    """What each Ray Train worker runs: read its share of the data, build the model (or restore
    it from the last checkpoint), `fit` reporting each epoch with a checkpoint; then rank 0
    evaluates the best weights and reports the run's files."""
    import ray.train

    data_config = from_dict(DataConfig, loop_config["data"])
    train_config = from_dict(TrainConfig, loop_config["train"])
    run_dir = loop_config["run_dir"]
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()

    strategy = _start_worker(train_config)
    worker_data = _load_worker_data(data_config, train_config, rank, world_size)
    model, initial_epoch, history = _build_or_restore_model(strategy, train_config, worker_data)
    if rank == 0:
        _record_placement_group(run_dir)
    callbacks = _worker_callbacks(train_config, run_dir, rank, history)
    train_seconds = _fit(strategy, model, train_config, worker_data, initial_epoch, callbacks, rank)
    facts = {
        "epochs_run": len(history),
        "resumed_from_epoch": initial_epoch,  # > 0 when a restart resumed a checkpoint
        "train_seconds": round(train_seconds, 2),
        "workers": world_size,
        "replicas_in_sync": strategy.num_replicas_in_sync,  # 1 if TF_CONFIG did not join them
    }
    _finish(model, history, data_config, train_config, worker_data, facts, rank,
            evaluate_test=loop_config["evaluate_test"])


def _start_worker(train_config: TrainConfig):
    """TensorFlow's thread pools sized to the worker's CPUs, and the distribution strategy."""
    import tensorflow as tf

    try:  # two TensorFlow processes with default pools fight over the same cores
        tf.config.threading.set_intra_op_parallelism_threads(train_config.cpus_per_worker)
        tf.config.threading.set_inter_op_parallelism_threads(train_config.cpus_per_worker)
    except RuntimeError:
        pass  # TensorFlow already started in this process: keep its pools
    return tf.distribute.MultiWorkerMirroredStrategy()


@dataclasses.dataclass
class WorkerData:
    """One worker's share of the data, and the step counts every worker shares."""

    index: data.DatasetIndex
    image_size: int
    train_dataset: object  # tf.data.Dataset
    val_dataset: object  # tf.data.Dataset
    steps_per_epoch: int
    validation_steps: int
    skipped: list  # (file, reason) of the photos of this share that did not decode


def _load_worker_data(data_config: DataConfig, train_config: TrainConfig, rank: int,
                      world_size: int) -> WorkerData:
    """The worker's share of the train and validation photos as datasets."""
    image_size = models.resolve_input(train_config.model, data_config.image_size).image_size
    index = data.load_index(data_config)
    train_images, train_labels, skipped = data.load_images(
        index.splits["train"], image_size, data_config, rank, world_size
    )
    val_images, val_labels, val_skipped = data.load_images(
        index.splits["validation"], image_size, data_config, rank, world_size
    )
    # Synchronous training needs the same step count on every worker: the smallest share.
    batch_size = train_config.per_worker_batch_size
    views = max(data_config.augmented_views, 1)
    smallest_train = len(index.splits["train"]) // world_size * views
    smallest_val = max(len(index.splits["validation"]) // world_size, 1)
    return WorkerData(
        index=index,
        image_size=image_size,
        train_dataset=data.make_dataset(
            train_images, train_labels, index.num_classes, batch_size, data_config, True, True
        ),
        val_dataset=data.make_dataset(
            val_images, val_labels, index.num_classes, batch_size, data_config, False, True
        ),
        steps_per_epoch=max(smallest_train // batch_size, 1),
        validation_steps=max(-(-smallest_val // batch_size), 1),
        skipped=skipped + val_skipped,
    )


def _build_or_restore_model(strategy, train_config: TrainConfig, worker_data: WorkerData):
    """The compiled model under the strategy, and (initial epoch, history): (0, []) for a new
    run, the last reported epoch's weights, history and learning rate for a restarted one."""
    import ray.train
    import tf_keras as keras

    keras.utils.set_random_seed(train_config.seed)
    with strategy.scope():
        model = models.create_model(
            train_config.model, worker_data.index.num_classes, worker_data.image_size,
            train_config.weights, train_config.hparams,
        )
        if train_config.head_weights:
            model.get_layer("head").load_weights(train_config.head_weights)
        models.unfreeze_top(model, train_config.fine_tune_fraction)
        compile_model(model, train_config)
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return model, 0, []
    with checkpoint.as_directory() as directory:  # a restarted run: continue from the last epoch
        model.load_weights(os.path.join(directory, runs.CHECKPOINT_WEIGHTS))
        state = runs.read_json(os.path.join(directory, runs.CHECKPOINT_STATE))
    keras.backend.set_value(model.optimizer.learning_rate, state["learning_rate"])
    return model, state["epoch"], state["history"]


def _record_placement_group(run_dir: str) -> None:
    """Rank 0 records the workers' placement group: a search frees it if Tune stops the trial
    mid-run (`runs.record_placement_group` says why)."""
    import ray

    group = ray.util.get_current_placement_group()
    if group:
        runs.record_placement_group(run_dir, group)


def _worker_callbacks(train_config: TrainConfig, run_dir: str, rank: int, history: list) -> list:
    """The study's callbacks, and the report of each epoch to Ray. Only rank 0 writes where
    people look; the others write their TensorBoard logs to scratch space."""
    log_dir = os.path.join(run_dir, runs.TENSORBOARD) if rank == 0 else tempfile.mkdtemp()
    return build_callbacks(train_config, log_dir) + [_make_report_callback(rank, history, run_dir)]


def _fit(strategy, model, train_config: TrainConfig, worker_data: WorkerData, initial_epoch: int,
          callbacks: list, rank: int) -> float:
    """`model.fit` on the worker's share; returns the seconds it took."""

    # Given a plain dataset, Keras would take its batch for the global batch and split it
    # between the workers: each would train on half its batch a step, so on half its share an
    # epoch, and validate on half of its validation photos. From a function, each worker's
    # batches are its own, whole: the global batch is the workers' together.
    def as_own_share(dataset):
        return strategy.distribute_datasets_from_function(lambda context: dataset)

    started = time.time()
    model.fit(
        as_own_share(worker_data.train_dataset),
        epochs=train_config.epochs,
        initial_epoch=initial_epoch,
        steps_per_epoch=worker_data.steps_per_epoch,
        validation_data=as_own_share(worker_data.val_dataset),
        validation_steps=worker_data.validation_steps,
        callbacks=callbacks,
        verbose=2 if rank == 0 and console.verbose() else 0,
    )
    return time.time() - started


def _finish(model, history: list, data_config: DataConfig, train_config: TrainConfig,
            worker_data: WorkerData, facts: dict, rank: int, evaluate_test: bool) -> None:
    """The final checkpoint: every worker reads the weights (reading a distributed model is
    collective: batch normalisation's statistics are synchronised on read); rank 0 evaluates a
    plain copy outside the strategy, so no other worker has to take part, and reports the
    run's files (`runs.write_final_run`) for the driver to copy. The copy, without the
    optimizer's state, is the run's model.keras: a third of the size with Adam, and it loads
    in seconds where the compiled model's took 40 (Xception, 299 px)."""
    import ray.train
    import tf_keras as keras

    with tempfile.TemporaryDirectory() as final_dir:
        model_path = os.path.join(final_dir, runs.MODEL)
        weights = model.get_weights()
        _save_state(final_dir, model, history)  # resuming a finished run only re-evaluates
        final_checkpoint = None
        if rank == 0:
            plain = keras.models.clone_model(model)
            plain.set_weights(weights)
            plain.save(model_path)
            metrics, confusions = _evaluate_final(plain, data_config, train_config, worker_data, evaluate_test)
            metrics.update(facts)
            runs.write_final_run(final_dir, model=model_path, metrics=_ordered(metrics),
                                 history=history, confusions=confusions)
            final_checkpoint = ray.train.Checkpoint.from_directory(final_dir)
        ray.train.report(
            {"final": 1, "epoch": len(history), **(history[-1] if history else {})},
            checkpoint=final_checkpoint,
        )


def _evaluate_final(model, data_config: DataConfig, train_config: TrainConfig,
                    worker_data: WorkerData, evaluate_test: bool) -> tuple[dict, list]:
    """(metrics, confusions) of the trained model on the whole validation split, and on the
    test split unless a search trial (the test split is for final models only)."""
    index, image_size = worker_data.index, worker_data.image_size
    images, labels, _ = data.load_images(index.splits["validation"], image_size, data_config)
    flip = data_config.test_time_flip
    val_metrics, confusions = evaluate.evaluate_model(model, images, labels, index.class_names, test_time_flip=flip)
    metrics = {
        "model": train_config.model,
        "image_size": image_size,
        "class_names": index.class_names,
        "validation": val_metrics,
        "num_train_images": len(index.splits["train"]),
    }
    test_skipped = []
    if evaluate_test:
        images, labels, test_skipped = data.load_images(index.splits["test"], image_size, data_config)
        metrics["test"], confusions = evaluate.evaluate_model(model, images, labels, index.class_names, test_time_flip=flip)
    skipped = index.skipped + worker_data.skipped + test_skipped
    metrics["skipped"] = [list(item) for item in skipped]
    return metrics, confusions


def _ordered(metrics: dict) -> dict:
    """metrics.json's keys in a reader's order: what was trained, how it did, how it ran."""
    order = ("model", "image_size", "class_names", "validation", "epochs_run", "resumed_from_epoch",
             "train_seconds", "workers", "replicas_in_sync", "num_train_images", "test", "skipped")
    return {**{key: metrics[key] for key in order if key in metrics}, **metrics}


def absolute_paths(data_config: DataConfig, train_config: TrainConfig):
    """The configurations with absolute paths: Ray workers run in other directories."""

    def absolute(path):
        return os.path.abspath(os.path.expanduser(path)) if path else path

    data_config = dataclasses.replace(
        data_config,
        data_dir=absolute(data_config.data_dir),
        tfds_dir=absolute(data_config.tfds_dir),
        cache_dir=absolute(data_config.cache_dir),
    )
    if train_config.weights not in (None, "imagenet"):
        train_config = dataclasses.replace(train_config, weights=absolute(train_config.weights))
    return data_config, dataclasses.replace(train_config, head_weights=absolute(train_config.head_weights))


def _save_state(directory: str, model, history: list) -> None:
    """What a restarted run needs: the weights, the epochs done and the learning rate."""
    import tf_keras as keras

    model.save_weights(os.path.join(directory, runs.CHECKPOINT_WEIGHTS))
    learning_rate = float(keras.backend.get_value(model.optimizer.learning_rate))
    state = {"epoch": len(history), "history": history, "learning_rate": learning_rate}
    runs.write_json(os.path.join(directory, runs.CHECKPOINT_STATE), state)


def _make_report_callback(rank: int, history: list, run_dir: str):
    import ray.train
    import tf_keras as keras

    class ReportEachEpoch(keras.callbacks.Callback):
        """Report each epoch's metrics to Ray with a checkpoint to resume from."""

        def on_epoch_end(self, epoch, logs=None):
            row = {"epoch": epoch + 1, **{k: float(v) for k, v in (logs or {}).items()}}
            history.append(row)
            if rank == 0:  # live curves, and the history of a trial that a scheduler stops
                runs.write_json(os.path.join(run_dir, runs.HISTORY), history)
            with tempfile.TemporaryDirectory() as directory:
                # Saving is collective under the strategy: every worker saves, rank 0 reports.
                _save_state(directory, self.model, history)
                checkpoint = ray.train.Checkpoint.from_directory(directory) if rank == 0 else None
                ray.train.report(row, checkpoint=checkpoint)

    return ReportEachEpoch()


class EpochLines(threading.Thread):
    """While a run trains, a line on the console for each epoch its rank 0 writes to the run's
    history (without --verbose, its workers' own output does not reach the console)."""

    METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")  # as Keras names them
    POLL_S = 1.0

    def __init__(self, run_dir: str, epochs: int):
        super().__init__(daemon=True, name="epoch-lines")
        self.path, self.epochs = os.path.join(run_dir, runs.HISTORY), epochs
        # The run's folder and its parent's: `runs/cnn3v2`, `cnn3v2/final`.
        self.name = os.path.join(*os.path.normpath(os.path.abspath(run_dir)).split(os.sep)[-2:])
        self.stopped = threading.Event()
        self.shown = len(self._history())  # a resumed run's earlier epochs were shown before

    def _history(self) -> list:
        try:
            return runs.read_json(self.path)
        except (OSError, ValueError):  # not written yet, or being written
            return []

    def _show_new(self) -> None:
        history = self._history()
        for row in history[self.shown:]:
            shown = ", ".join(f"{key} {row[key]:.3f}" for key in self.METRICS if key in row)
            log.info("%s: epoch %d/%d: %s", self.name, row["epoch"], self.epochs, shown)
        self.shown = max(self.shown, len(history))

    def run(self) -> None:
        while not self.stopped.wait(self.POLL_S):
            self._show_new()
        self._show_new()

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc_info):
        self.stopped.set()
        self.join()


def run_training(
    data_config: DataConfig,
    train_config: TrainConfig,
    run_dir: str,
    callbacks: list | None = None,
    resume: bool = False,
    evaluate_test: bool = True,
    epoch_lines: bool = True,
) -> dict:
    """Train `train_config.model` on Ray Train and leave the run's files in `run_dir`.

    Starts a local Ray if none is running. `callbacks` are Ray Train callbacks (a Tune trial
    passes `TuneReportCallback`). A run directory that already holds a run is an error
    unless `resume`, which continues it from its last checkpoint. Search trials pass
    `evaluate_test=False`: their confusions are then the validation split's, and
    `epoch_lines=False`: their progress is the search's. Returns the run's metrics (also in
    `metrics.json`).
    """
    import ray

    _check_before_ray(train_config)
    data_config, train_config = absolute_paths(data_config, train_config)
    run_dir = _start_run_dir(data_config, train_config, run_dir, resume)
    if not ray.is_initialized():
        console.init_ray()
    trainer = _build_trainer(data_config, train_config, run_dir, callbacks, evaluate_test)
    shown = epoch_lines and not console.verbose()
    with EpochLines(run_dir, train_config.epochs) if shown else contextlib.nullcontext():
        result = _fit_trainer(trainer)
    with result.checkpoint.as_directory() as directory:
        runs.copy_run_files(directory, run_dir)
    metrics = runs.read_json(os.path.join(run_dir, runs.METRICS))
    if metrics.get("skipped"):
        log.warning("%s: %d photos could not be read and were skipped (listed in %s)", os.path.basename(run_dir),
                    len(metrics["skipped"]), os.path.join(run_dir, runs.METRICS))
    return metrics


def _check_before_ray(train_config: TrainConfig) -> None:
    """An unknown model, a bad hyperparameter or a missing weights file fails before Ray starts."""
    models.get_model_spec(train_config.model)
    models.resolve_hparams(train_config.model, train_config.hparams)
    if train_config.weights not in (None, "imagenet") and not os.path.isfile(train_config.weights):
        raise ValueError(f"weights file not found: {train_config.weights}")
    transfer = models.get_model_spec(train_config.model).backbone is not None
    if (train_config.fine_tune_fraction or train_config.head_weights) and not transfer:
        raise ValueError(f"--fine-tune-fraction and --head-weights are for transfer models, not {train_config.model}")
    if train_config.head_weights and not os.path.isfile(train_config.head_weights):
        raise ValueError(f"head weights file not found: {train_config.head_weights}")


def _start_run_dir(data_config: DataConfig, train_config: TrainConfig, run_dir: str, resume: bool) -> str:
    """The run directory (absolute), with the run's `config.json`; one that holds a run
    already is an error unless `resume`."""
    run_dir = os.path.abspath(run_dir)
    if os.path.exists(os.path.join(run_dir, runs.RAY, runs.RAY_TRAIN)) and not resume:
        raise ValueError(f"{run_dir} holds a run already: resume it, or choose another output")
    os.makedirs(run_dir, exist_ok=True)
    runs.write_json(
        os.path.join(run_dir, runs.CONFIG),
        {"data": to_dict(data_config), "train": to_dict(train_config), "versions": versions()},
    )
    return run_dir


def _set_tf_config(addresses: list[str], index: int) -> None:
    """A worker's `TF_CONFIG`, for MultiWorkerMirroredStrategy."""
    import json

    os.environ["TF_CONFIG"] = json.dumps(
        {"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})


def _backend_config():
    """Ray's `TensorflowConfig` (it sets each worker's `TF_CONFIG`), defined here: unpickling
    Ray's own imports TensorFlow, as its package's `__init__` does, and that cost Ray Train's
    controller, which never trains, 4 s of CPU on every run."""
    import ray
    from ray.train.backend import Backend, BackendConfig
    from ray.train.v2._internal.util import TrainingFramework

    class _Backend(Backend):
        def on_start(self, worker_group, backend_config):
            from ray.train._internal.utils import get_address_and_port

            def address():
                host, port = get_address_and_port()
                return f"{host}:{port}"

            addresses = worker_group.execute(address)
            ray.get([worker_group.execute_single_async(i, _set_tf_config, addresses, i)
                     for i in range(len(addresses))])

    class _Config(BackendConfig):
        backend_cls = property(lambda self: _Backend)
        framework = property(lambda self: TrainingFramework.TENSORFLOW)  # for Ray's Train state

    return _Config()


def _build_trainer(data_config: DataConfig, train_config: TrainConfig, run_dir: str,
                   callbacks: list | None, evaluate_test: bool):
    """The `TensorflowTrainer`: `train_config.workers` workers of `train_loop_per_worker`,
    checkpoints and restarts under `run_dir/ray/`."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.tensorflow import TensorflowTrainer

    resources = {"CPU": train_config.cpus_per_worker}
    if train_config.gpus_per_worker:
        resources["GPU"] = train_config.gpus_per_worker
    return TensorflowTrainer(
        train_loop_per_worker,
        tensorflow_config=_backend_config(),
        train_loop_config={
            "data": to_dict(data_config),
            "train": to_dict(train_config),
            "run_dir": run_dir,
            "evaluate_test": evaluate_test,
        },
        scaling_config=ScalingConfig(
            num_workers=train_config.workers,
            use_gpu=bool(train_config.gpus_per_worker),
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=runs.RAY_TRAIN,
            storage_path=os.path.join(run_dir, runs.RAY),
            failure_config=FailureConfig(max_failures=train_config.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def _fit_trainer(trainer):
    """`trainer.fit()`, with this process's SIGINT handler as it was before."""
    # Ray Train leaves a SIGINT handler holding its controller actor: keep it alive (and its
    # resources reserved) no longer than the run, or later runs in this process wait forever.
    sigint_handler = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, sigint_handler)


def versions() -> dict:
    """The versions that produced a run, saved beside its configuration."""
    import importlib.metadata as metadata
    import platform

    found = {"python": platform.python_version()}
    for package in ("dogbreeds", "ray", "tensorflow", "tf-keras", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found
