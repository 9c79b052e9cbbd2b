"""`dogbreeds train` as a job on a running Ray cluster (the CLI's options, unchanged).

    ray submit ray_cluster.yaml cluster/train.py -- xception --workers 4 --gpus-per-worker 1 --cpus-per-worker 4 --output runs/xception
    ray job submit --working-dir . -- python cluster/train.py cnn3v2 --data-dir ... --output runs/cnn3v2

A relative --output, --features-dir, --cache-dir or --tfds-dir lands under $DOGBREEDS_STORAGE
(shared storage every node mounts, set by ray_cluster.yaml), so trials on any node read and
write the same run. `ray submit` copies this file alone; the nodes have the package (ray_cluster.yaml installs it).
"""

import sys

from dogbreeds.cli import main_on_cluster

SUBCOMMAND = ["train"]

if __name__ == "__main__":
    sys.exit(main_on_cluster(SUBCOMMAND + sys.argv[1:]))
