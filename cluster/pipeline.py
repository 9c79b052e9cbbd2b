"""`dogbreeds pipeline` (the whole study) as a job on a running Ray cluster (the CLI's options).

    ray submit ray_cluster.yaml cluster/pipeline.py -- --profile full --output runs/study
    ray job submit --working-dir . -- python cluster/pipeline.py --profile quick --data-dir ... --output runs/quick

A relative --output, --features-dir, --cache-dir or --tfds-dir lands under $DOGBREEDS_STORAGE
(shared storage every node mounts, set by ray_cluster.yaml), so trials on any node read and
write the same run. `ray submit` copies this file alone; the nodes have the package (ray_cluster.yaml installs it).
"""

import sys

from dogbreeds.cli import main_on_cluster

SUBCOMMAND = ["pipeline"]

if __name__ == "__main__":
    sys.exit(main_on_cluster(SUBCOMMAND + sys.argv[1:]))
