"""The `dogbreeds` command: one subcommand per stage.

    dogbreeds models
    dogbreeds data --data-dir ../shared/data/tiny_dogs_64
    dogbreeds train cnn3v2 --data-dir ../shared/data/tiny_dogs_64 --image-size 64 --epochs 8 \
        --workers 2 --output runs/cnn3v2
    dogbreeds report runs/cnn3v2
    dogbreeds bench pipeline --data-dir ../shared/data/stanford_dogs_sample --output runs
    dogbreeds serve bundles/best --examples ../shared/data/stanford_dogs_sample

Its options are derived from the configuration classes (options.py); each command's work is in
commands.py. This module runs one command: `main`, and `main_on_cluster` for `cluster/` jobs.

Bad options, missing paths and bad files end in one line on stderr and a non-zero exit, checked
before Ray starts wherever they can be; any other error too (`--verbose` adds its traceback).
Ctrl-C ends a run with exit 130. Messages go through `logging` (stderr); results go to stdout.
TensorFlow's start-up noise is filtered from stderr unless `--verbose` (console.py: what else it shows).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading

from dogbreeds import commands, console
from dogbreeds.options import build_parser, read_config_file

log = logging.getLogger("dogbreeds")


# ---------------------------------------------------------------------------------------------
# Messages, TensorFlow's noise, errors and Ctrl-C.

# Lines TensorFlow's C++ side writes to stderr at start-up, before absl's logging is set up
# (so TF_CPP_MIN_LOG_LEVEL cannot hide them), in our process and in every Ray worker (whose
# output Ray forwards here): none is about the run.
NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called|oneDNN custom operations are on"
    r"|Could not find cuda drivers|failed call to cuInit|cuda_platform\.cc|cudart_stub\.cc"
    r"|Unable to register cu(DNN|FFT|BLAS) factory|computation_placer\.cc|TF-TRT Warning"
    r"|This TensorFlow binary is optimized to use available CPU instructions"
    r"|rebuild TensorFlow with the appropriate compiler flags"
)


class _NoiseFilter:
    """stderr (file descriptor 2, which C++ code and child processes write to) through a pipe
    that drops `NOISE` lines; `close` restores it once what was written is passed on."""

    SENTINEL = b"\0dogbreeds-noise-filter-end\n"

    def __init__(self):
        sys.stderr.flush()
        self.original = os.dup(2)
        read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self.drained = threading.Event()
        self.thread = threading.Thread(target=self._pump, args=(read,), daemon=True, name="stderr-filter")
        self.thread.start()

    def _pump(self, read: int) -> None:
        pending = b""
        while chunk := os.read(read, 65536):
            # Whole lines, and progress bars' "\r" updates as they come; a partial line waits.
            *lines, pending = re.split(rb"(?<=[\r\n])", pending + chunk)
            for line in lines:
                if line == self.SENTINEL:
                    self.drained.set()
                elif not NOISE.search(line.decode(errors="replace")):
                    self._write(line)
        self._write(pending)
        self.drained.set()

    def _write(self, data: bytes) -> None:
        try:
            os.write(self.original, data)
        except OSError:  # the reader went away (`| head`): keep draining, or writers would block
            pass

    def close(self) -> None:
        sys.stderr.flush()
        os.write(2, self.SENTINEL)
        self.drained.wait(timeout=5)
        os.dup2(self.original, 2)  # Ray processes still holding the pipe stay filtered


class _StderrHandler(logging.StreamHandler):
    """To whatever sys.stderr is when a message is written (a test may have replaced it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _configure_logging(verbose: bool) -> None:
    """Our messages to stderr: INFO, or DEBUG with --verbose; absl's warnings only if verbose."""
    logger = logging.getLogger("dogbreeds")
    for handler in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(handler)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("absl").setLevel(logging.DEBUG if verbose else logging.ERROR)


def _stop_ray() -> None:
    """Shut down the Ray this process started (its raylet and workers), if any."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - already stopping; the interruption is the message
            pass


def _name(args) -> str:
    return " ".join(["dogbreeds", args.command] + [getattr(args, key) for key in ("search", "bench") if getattr(args, key, None)])


def main(argv: list[str] | None = None) -> int:
    """Run `dogbreeds ARGV`; returns the exit status (0, 1 for an error, 2 for bad options, 130
    for Ctrl-C). Called without `argv` (the installed command, `python -m dogbreeds`), it also
    filters TensorFlow's start-up noise from stderr unless --verbose."""
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    # Ctrl-C reaches us (below) instead of Tune's handler, which would end the trials and let
    # the search go on to retrain the best of them; `--resume` continues from Tune's state.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    console.set_verbose(verbose)
    _configure_logging(verbose)
    noise_filter = _NoiseFilter() if argv is None and not verbose else None
    try:
        status, message = _run_command(args, verbose)
    finally:
        if noise_filter is not None:
            _stop_ray()  # Ray prints its deduplicated workers' lines ("[repeated 3x ...]") as it stops
            noise_filter.close()
    if message:
        print(f"{_name(args)}: {message}", file=sys.stderr, flush=True)
    return status


def _run_command(args, verbose: bool) -> tuple[int, str | None]:
    """Run the command: its exit status, and the one line to print about it (None: nothing)."""
    try:
        read_config_file(args)
        commands.COMMANDS[args.command](args)
        return 0, None
    except (KeyboardInterrupt, SystemExit):  # Ray Train's own Ctrl-C handler ends in sys.exit
        _stop_ray()
        return 130, "interrupted" + ("; `--resume` continues it" if args.command in commands.RESUMABLE else "")
    except Exception as error:  # noqa: BLE001 - every error is one line (--verbose: a traceback)
        if verbose:
            log.exception("the error's traceback:")
        return 1, "error: " + (" ".join(str(error).split()) or type(error).__name__)


# ---------------------------------------------------------------------------------------------
# Running on a cluster.


# Options whose relative paths a cluster job puts on the shared storage.
STORAGE_OPTIONS = ("--output", "--features-dir", "--cache-dir", "--tfds-dir", "--examples", "--examples-dir",
                   "--api-token-file")


def on_storage(argv: list[str]) -> list[str]:
    """argv with relative storage paths (and `serve`'s bundle) moved under $DOGBREEDS_STORAGE,
    the storage every node of a cluster mounts (ray_cluster.yaml sets it); unchanged if unset."""
    storage = os.environ.get("DOGBREEDS_STORAGE")
    argv = list(argv)
    if not storage:
        return argv

    def moved(path):
        return path if os.path.isabs(path) else os.path.join(storage, path)

    if argv[:1] == ["serve"] and len(argv) > 1 and not argv[1].startswith("-"):
        argv[1] = moved(argv[1])
    for position, option in enumerate(argv[:-1]):
        if option in STORAGE_OPTIONS:
            argv[position + 1] = moved(argv[position + 1])
    return argv


def main_on_cluster(argv: list[str]) -> int:
    """A `cluster/` job: attach to the running Ray cluster (the CLI then starts no Ray of its
    own), and run the command with its storage paths on the shared storage."""
    import ray

    verbose = {console.VERBOSE_VARIABLE: "1"} if "--verbose" in argv else {}
    console.set_verbose(bool(verbose))
    console.init_ray(address="auto", runtime_env={"env_vars": verbose})
    return main(on_storage(argv))


if __name__ == "__main__":
    sys.exit(main())
