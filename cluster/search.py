"""`dogbreeds search` as a job on a running Ray cluster (the CLI's options, unchanged).

    ray submit ray_cluster.yaml cluster/search.py -- head --backbone xception --trials 32 --concurrent-trials 8 --gpus-per-worker 0.25 --output runs/head
    ray job submit --working-dir . -- python cluster/search.py head --backbone mobilenet_025 ... --output runs/head

A relative --output, --features-dir, --cache-dir or --tfds-dir lands under $DOGBREEDS_STORAGE
(shared storage every node mounts, set by ray_cluster.yaml), so trials on any node read and
write the same run. `ray submit` copies this file alone; the nodes have the package (ray_cluster.yaml installs it).
"""

import sys

from dogbreeds.cli import main_on_cluster

SUBCOMMAND = ["search"]

if __name__ == "__main__":
    sys.exit(main_on_cluster(SUBCOMMAND + sys.argv[1:]))
