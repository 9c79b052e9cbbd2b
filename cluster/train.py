"""`dogbreeds train` as a job on a running Ray cluster (the CLI's options, unchanged).

    ray submit ray_cluster.yaml cluster/train.py -- xception --workers 4 --gpus-per-worker 1 --cpus-per-worker 4 --output runs/xception
    ray job submit --working-dir . -- python cluster/train.py cnn3v2 --data-dir ... --output runs/cnn3v2

A relative --output, --features-dir, --cache-dir or --tfds-dir lands under $DOGBREEDS_STORAGE
(shared storage every node mounts, set by ray_cluster.yaml), so trials on any node read and
write the same run. This file is self-contained: `ray submit` copies it alone to the head node.
"""

import os
import sys

SUBCOMMAND = ["train"]
STORAGE_OPTIONS = ("--output", "--features-dir", "--cache-dir", "--tfds-dir")


def on_storage(argv: list[str]) -> list[str]:
    """argv with relative storage paths moved under $DOGBREEDS_STORAGE (when it is set)."""
    storage = os.environ.get("DOGBREEDS_STORAGE")
    argv = list(argv)
    for position, option in enumerate(argv[:-1]):
        if storage and option in STORAGE_OPTIONS and not os.path.isabs(argv[position + 1]):
            argv[position + 1] = os.path.join(storage, argv[position + 1])
    return argv


def main(argv: list[str]) -> int:
    import ray

    from dogbreeds import cli

    ray.init(address="auto")  # attach to the cluster; the CLI then skips its own ray.init
    return cli.main(SUBCOMMAND + on_storage(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
