"""`dogbreeds serve` as a job on a running Ray cluster: Serve on the cluster, serving until
the job is stopped (the CLI's options, unchanged). `serve deploy cluster/serve_config.yaml`
is the declarative alternative; this one is the CLI's.

    ray submit ray_cluster.yaml cluster/serve.py -- runs/study/bundle --gpus-per-replica 0.5 --max-replicas 4
    ray job submit --working-dir . -- python cluster/serve.py runs/study/bundle

A relative bundle path, like the other entry points' relative --output, is read from
$DOGBREEDS_STORAGE (shared storage every node mounts, set by ray_cluster.yaml), so a replica on
any node loads the same bundle. `ray submit` copies this file alone; the nodes have the package (ray_cluster.yaml installs it).
"""

import sys

from dogbreeds.cli import main_on_cluster

SUBCOMMAND = ["serve"]

if __name__ == "__main__":
    sys.exit(main_on_cluster(SUBCOMMAND + sys.argv[1:]))
