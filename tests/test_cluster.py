"""The cluster side: ray_cluster.yaml against Ray's own validation, the cluster/ entry points,
and a real two-node Ray cluster on this machine (a head and a worker node, each its own
`ray start`, token authentication on): a head search submitted with `ray job submit` spreads
its trials over both nodes, finishes every trial when the worker node is killed mid-search,
and, its driver killed too, is finished by `--resume`.

Each node has one logical CPU and each trial asks for one, so two concurrent trials must run
on different nodes. Node IPs are equal on one machine: a trial's node is found from its
process id (Tune's result.json) and Ray's actor table (`ray list actors`).
"""

import collections
import copy
import csv
import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import time

import pytest
import yaml

from tests.conftest import (
    MOBILENET_WEIGHTS, RAY, ROOT, TINY_DIR, LocalCluster, assert_study_holds, cluster_environment,
)

ENTRY_POINTS = {"pipeline": "pipeline", "search": "search", "train": "train", "serve": "serve"}


def _cluster_config():
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def _validate(config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))  # Ray's defaults for the provider, no cloud call
    validate_config(prepared)  # ray-schema.json, then Ray's own cross-field checks
    return prepared


def test_cluster_config_passes_rays_validation():
    prepared = _validate(_cluster_config())
    head, workers = prepared["head_node_type"], prepared["available_node_types"]
    gpu_types = [name for name in workers if name != head]
    assert gpu_types and all(workers[name]["max_workers"] > workers[name]["min_workers"] for name in gpu_types)
    assert any('"/home/ray/dogbreeds[gpu]"' in command for command in prepared["setup_commands"])
    assert "/home/ray/dogbreeds" in prepared["file_mounts"]
    # The dashboard only on the head's loopback (reached by `ray dashboard`'s port-forward).
    start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start and "0.0.0.0" not in start
    assert all("RAY_AUTH_MODE=token" in c for c in (start, " ".join(prepared["worker_start_ray_commands"])))
    assert any("DOGBREEDS_STORAGE=/mnt/shared" in command for command in prepared["setup_commands"])
    # Runs, bundles and Tune's pickled state: writable by the ray user alone, never world-writable.
    storage = " ".join(prepared["initialization_commands"])
    assert "chmod 700 /mnt/shared" in storage and not re.search(r"chmod [0-7]*[2367]\b", storage)


@pytest.mark.parametrize("breakage", ["unknown key", "min above max", "no such head type"])
def test_a_broken_cluster_config_is_rejected(breakage):
    config = _cluster_config()
    if breakage == "unknown key":
        config["max_wrokers"] = 2
    elif breakage == "min above max":
        config["available_node_types"]["gpu_worker"]["min_workers"] = config["max_workers"] + 1
    else:
        config["head_node_type"] = "nope"
    with pytest.raises(Exception) as error:
        _validate(config)
    assert type(error.value).__name__ in ("ValidationError", "ValueError")


def _load_entry_point(name):
    spec = importlib.util.spec_from_file_location(f"cluster_{name}", ROOT / "cluster" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # import-safe: no Ray, no work
    return module


@pytest.mark.parametrize("name", sorted(ENTRY_POINTS))
def test_entry_point_takes_the_clis_options(name):
    from dogbreeds import cli, options

    module = _load_entry_point(name)
    assert module.SUBCOMMAND == [ENTRY_POINTS[name]]
    samples = {
        "pipeline": ["--profile", "full", "--output", "runs/study"],
        "search": ["head", "--backbone", "xception", "--output", "runs/head"],
        "train": ["xception", "--workers", "4", "--output", "runs/xception"],
        "serve": ["runs/bundle"],
    }
    args = options.build_parser().parse_args(cli.on_storage(module.SUBCOMMAND + samples[name]))
    assert args.command == ENTRY_POINTS[name]


def test_relative_storage_paths_go_to_the_shared_storage(monkeypatch):
    from dogbreeds import cli

    argv = ["search", "head", "--output", "runs/a", "--features-dir", "/abs/f", "--cache-dir", "c", "--data-dir", "d"]
    monkeypatch.delenv("DOGBREEDS_STORAGE", raising=False)
    assert cli.on_storage(argv) == argv
    monkeypatch.setenv("DOGBREEDS_STORAGE", "/mnt/shared/dogbreeds")
    assert cli.on_storage(argv) == [
        "search", "head", "--output", "/mnt/shared/dogbreeds/runs/a", "--features-dir", "/abs/f",
        "--cache-dir", "/mnt/shared/dogbreeds/c", "--data-dir", "d",
    ]
    assert cli.on_storage(["serve", "runs/bundle", "--port", "8000"])[1] == "/mnt/shared/dogbreeds/runs/bundle"


# ---------------------------------------------------------------------------------------------
# A real two-node cluster on this machine.


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A head and a worker node of one logical CPU each (tests/conftest.py's harness)."""
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster_logs"), workers=1, num_cpus=1)
    try:
        cluster.start()
        cluster.node_ids = dict(cluster.alive_nodes())  # node id -> is head, as started
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def shared_dirs(tmp_path_factory, cache_dir):
    """The feature cache every search here shares (the first computes the features, the others
    reuse them), and the session's image cache (photos already decoded at 64 px are read)."""
    return str(tmp_path_factory.mktemp("features")), cache_dir


# Epochs of each trial of the searches here.
EPOCHS = 12


def _search_command(output, shared_dirs, trials, epochs):
    """A head search of slow trials: one photo a step, over 50 photos of each breed (270 steps an
    epoch, about half a second), so a trial lasts `epochs` / 2 seconds and reports often; no
    early stopping, so that every trial runs all its epochs."""
    features_dir, cache_dir = shared_dirs
    return [
        "python", "cluster/search.py", "head", "--backbone", "mobilenet_025",
        "--weights", str(MOBILENET_WEIGHTS), "--data-dir", str(TINY_DIR), "--image-size", "64",
        "--subset-per-class", "50", "--batch-size", "1", "--scheduler", "none",
        "--views", "1", "--epochs", str(epochs), "--early-stopping-patience", str(epochs),
        "--trials", str(trials), "--concurrent-trials", "2",
        "--features-dir", features_dir, "--cache-dir", cache_dir, "--output", str(output),
    ]


def _submit(cluster, command, runtime_env=None):
    """`ray job submit --working-dir . -- COMMAND`, from the project's root, as README says."""
    submit = [RAY, "job", "submit", "--address", cluster.dashboard, "--working-dir", "."]
    if runtime_env:
        submit += ["--runtime-env-json", json.dumps(runtime_env)]
    return subprocess.Popen(submit + ["--", *command], cwd=ROOT, env=cluster_environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(job, timeout):
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        output, _ = job.communicate()
        pytest.fail(f"the job did not finish in {timeout} s:\n{output[-3000:]}")
    return job.returncode, output


def _rows(output):
    with open(os.path.join(output, "results.csv")) as handle:
        return list(csv.DictReader(handle))


def _tune_dir(output):
    """Tune's own files of the search writing to `output`."""
    return os.path.join(output, "tune", "search")


def _live_dir(cluster):
    """Tune's own files as the search's driver (on the head) writes them: it writes each result
    there at once, and copies its files to `_tune_dir` only now and then."""
    pattern = os.path.join(cluster.temp_dir["head"], "session_*", "artifacts", "*", "search", "driver_artifacts")
    return (sorted(glob.glob(pattern)) or [pattern])[-1]


def _tune_results(directory):
    """Every result (one per reported epoch) in Tune's result files in `directory`."""
    yield from _results(os.path.join(directory, "*", "result.json"))


def _results(pattern):
    for path in glob.glob(pattern):
        with open(path) as handle:
            yield from (json.loads(line) for line in handle if line.endswith("\n"))


def _trial_pids(output):
    """Trial id -> the process ids that reported its epochs, in order (a retried trial has
    more than one)."""
    pids = {}
    for result in _tune_results(_tune_dir(output)):
        trial_pids = pids.setdefault(result["trial_id"], [])
        if result["pid"] not in trial_pids:
            trial_pids.append(result["pid"])
    return pids


def _trial_nodes(cluster, output):
    """Trial id -> the node ids its processes ran on, in order."""
    node_of_pid = {actor["pid"]: actor["node_id"] for actor in cluster.state("actors", "--detail")}
    return {trial: [node_of_pid.get(pid) for pid in pids] for trial, pids in _trial_pids(output).items()}


def _tune_trials(directory):
    """Trial id -> (status, failures) from Tune's saved experiment state in `directory`; {}
    before it exists or while it is being written."""
    try:
        state_file = sorted(glob.glob(os.path.join(directory, "experiment_state-*.json")))[-1]
        with open(state_file) as handle:
            trial_data = json.load(handle)["trial_data"]
    except (IndexError, ValueError, KeyError, OSError):
        return {}
    trials = {}
    for trial, run in trial_data:
        trial, run = json.loads(trial), json.loads(run)
        trials[trial["trial_id"]] = (trial["status"], run["num_failures"])
    return trials


def _assert_every_trial_done_once(output, trials):
    rows = _rows(output)
    assert len(rows) == trials and len({row["trial_id"] for row in rows}) == trials, rows
    assert all(row["status"] == "done" and float(row["val_accuracy"]) > 0 for row in rows), rows
    assert os.path.isfile(os.path.join(output, "final", "metrics.json"))


@pytest.mark.long
def test_a_search_survives_its_worker_node_dying_and_its_driver_killed(cluster, shared_dirs, tmp_path):
    """A search job spreads its trials over both nodes, its relative --output on the storage its
    environment names. The worker node is killed under a running trial, which Tune runs again on
    the head; then the job's driver is killed, and `--resume` finishes the search: every trial
    once, and no finished trial run again."""
    worker = next(node for node, is_head in cluster.node_ids.items() if not is_head)
    head = next(node for node, is_head in cluster.node_ids.items() if is_head)
    output = str(tmp_path / "search")
    command = _search_command("search", shared_dirs, trials=3, epochs=EPOCHS)
    storage = {"env_vars": {"DOGBREEDS_STORAGE": str(tmp_path)}}
    job = _submit(cluster, command, runtime_env=storage)
    try:
        # Wait for a trial on the worker node to report an epoch, with at least half of its
        # epochs still to run, then kill that node.
        deadline, victim = time.time() + 300, None
        while victim is None and time.time() < deadline and job.poll() is None:
            time.sleep(0.5)
            live = list(_tune_results(_live_dir(cluster)))
            epochs = collections.Counter(result["trial_id"] for result in live)
            pids = {result["trial_id"]: result["pid"] for result in live}
            victim = next((trial for trial, pid in pids.items()
                           if cluster.runs("worker", pid) and epochs[trial] <= EPOCHS // 2), None)
        assert victim is not None, "no trial reached the worker node"
        cluster.kill("worker")
        # Once Tune has seen the victim fail, a trial has finished and another is still to
        # finish, SIGKILL the job's driver.
        deadline, finished = time.time() + 420, set()
        while time.time() < deadline and job.poll() is None:
            time.sleep(1)
            trials = _tune_trials(_tune_dir(output))  # what --resume will see
            finished = {trial for trial, (status, _) in trials.items() if status == "TERMINATED"}
            if finished and len(finished) < 3 and trials.get(victim, ("", 0))[1] >= 1:
                break
        assert finished and len(finished) < 3, f"no moment with some trials finished: {_tune_trials(_tune_dir(output))}"
        (driver,) = [j["driver_info"]["pid"] for j in cluster.state("jobs") if j["status"] == "RUNNING"]
        os.kill(int(driver), signal.SIGKILL)
        returncode, _ = _finish(job, timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
            job.communicate()
    assert returncode != 0  # the job failed with its driver
    reported = collections.Counter(r["trial_id"] for r in _tune_results(_tune_dir(output)))
    returncode, log = _finish(_submit(cluster, command + ["--resume"], runtime_env=storage), timeout=420)
    assert returncode == 0 and "succeeded" in log, log[-3000:]
    _assert_every_trial_done_once(output, 3)
    assert all(row["epochs"] == str(EPOCHS) for row in _rows(output))
    assert finished <= {row["trial_id"] for row in _rows(output)}  # the same search, continued
    after = collections.Counter(r["trial_id"] for r in _tune_results(_tune_dir(output)))
    assert all(after[trial] == reported[trial] for trial in finished), (reported, after)  # not run again
    nodes = _trial_nodes(cluster, output)
    used = {node for trial_nodes in nodes.values() for node in trial_nodes}
    print("trials per node:", {node[:8]: sum(node in n for n in nodes.values()) for node in used})
    assert None not in used and used == set(cluster.node_ids), f"trials ran on {used}, nodes {cluster.node_ids}"
    assert _tune_trials(_tune_dir(output))[victim][1] >= 1  # Tune saw the trial fail with its node ...
    assert nodes[victim][0] == worker and nodes[victim][-1] == head  # ... and ran it again on the head
    assert_study_holds(output, [row["trial_id"] for row in _rows(output)])
