"""`dogbreeds serve` as a job on a running Ray cluster: Serve on the cluster, serving until
the job is stopped (the CLI's options, unchanged). `serve deploy cluster/serve_config.yaml`
is the declarative alternative; this one is the CLI's.

    ray submit ray_cluster.yaml cluster/serve.py -- runs/study/bundle --gpus-per-replica 0.5 --max-replicas 4
    ray job submit --working-dir . -- python cluster/serve.py runs/study/bundle

A relative bundle path, like the other entry points' relative --output, is read from
$DOGBREEDS_STORAGE (shared storage every node mounts, set by ray_cluster.yaml), so a replica on
any node loads the same bundle. This file is self-contained: `ray submit` copies it alone.
"""

import os
import sys

SUBCOMMAND = ["serve"]
STORAGE_OPTIONS = ("--examples",)


def on_storage(argv: list[str]) -> list[str]:
    """argv with a relative bundle (the first argument) moved under $DOGBREEDS_STORAGE (when
    it is set)."""
    storage = os.environ.get("DOGBREEDS_STORAGE")
    argv = list(argv)
    if storage and argv and not argv[0].startswith("-") and not os.path.isabs(argv[0]):
        argv[0] = os.path.join(storage, argv[0])
    for position, option in enumerate(argv[:-1]):
        if storage and option in STORAGE_OPTIONS and not os.path.isabs(argv[position + 1]):
            argv[position + 1] = os.path.join(storage, argv[position + 1])
    return argv


def main(argv: list[str]) -> int:
    import ray

    from dogbreeds import cli

    ray.init(address="auto")  # attach to the cluster; Serve then starts on it, not on a new Ray
    return cli.main(SUBCOMMAND + on_storage(argv))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
