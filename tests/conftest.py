"""Shared fixtures: the real stand-in data in ../shared, one local Ray for the whole session,
one harness for the tests that start Ray clusters of their own with `ray start`, and the
session's runs: the README's own (cnn3v2 from scratch, mobilenet_025 and its bundle, both
searches), each run once for every module that checks it."""

import csv
import json
import os
import pathlib
import random
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

import dogbreeds  # noqa: F401 - sets TF_USE_LEGACY_KERAS before TensorFlow loads

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE_DIR = SHARED / "data" / "stanford_dogs_sample"
TINY_DIR = SHARED / "data" / "tiny_dogs_64"
DOGS_224_DIR = SHARED / "data" / "stanford_dogs_224"
NOT_DOGS_DIR = SHARED / "data" / "not_dogs"
MOBILENET_WEIGHTS = SHARED / "weights" / "mobilenet_2_5_224_tf_no_top.h5"
ARTIFACTS = ROOT / "test-artifacts"  # screenshots and reports kept after a run
RAY = str(ROOT / ".venv" / "bin" / "ray")
README = ROOT / "README.md"
README_SETUP = 'python3 -m venv .venv && .venv/bin/pip install -q -e ".[test]" && '
# Four logical CPUs on two cores: a run of two workers plus its driver must fit, and
# TensorFlow's thread counts are set per worker.
SESSION_RAY_CPUS = 4


# Ports handed out by this process come from below Linux's ephemeral range (32768-60999, where
# the kernel picks the local port of every outgoing connection, so a port free now may be taken
# a second later) and above Ray's default worker ports (10002-19999, the session's Ray), and
# never twice.
_PORTS = range(20000, 32768)
_handed_out = set()


def _bindable(port) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("", port))
        except OSError:
            return False
    return True


def free_port_range(size=1) -> tuple:
    """`size` consecutive ports nothing listens on, none handed out before: (first, last)."""
    for _ in range(500):
        first = random.randrange(_PORTS.start, _PORTS.stop - size)
        ports = range(first, first + size)
        if not _handed_out.intersection(ports) and all(_bindable(port) for port in ports):
            _handed_out.update(ports)
            return first, first + size - 1
    raise RuntimeError(f"no {size} free ports in {_PORTS}")


def free_port() -> int:
    """A port nothing listens on now (other Ray clusters and servers run on this machine too)."""
    return free_port_range()[0]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One image cache for the whole session, as a user's ~/.cache would be: photos are
    decoded once at each size, whichever test asks first."""
    return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray for the whole session, started by the first test that needs it
    (starting one costs seconds; tests that need none never start it). A test must leave it
    as it found it: tests/test_search.py checks that every CPU is free again after a search."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=SESSION_RAY_CPUS, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Ray clusters of their own: `ray start` nodes on this machine, as on a real cluster.


def _node_ports():
    """Every port a node listens on, free ones: other Ray clusters run on this machine too."""
    first, last = free_port_range(40)
    options = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
               "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    return [*(x for option in options for x in (option, str(free_port()))),
            "--min-worker-port", str(first), "--max-worker-port", str(last)]


def cluster_environment(**extra) -> dict:
    """The environment of every process of a `LocalCluster` and of every client of it: token
    auth (as Ray 2.60 sets up), the project's Python first on PATH (a job's `python` is the
    cluster's Python), and no RAY_ADDRESS pointing elsewhere."""
    environment = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0", **extra)
    environment["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{environment['PATH']}"
    environment.pop("RAY_ADDRESS", None)
    return environment


class LocalCluster:
    """A head node and `workers` worker nodes, each a `ray start --block` in its own process
    group and session, with its own temp dir (so no other `ray.init` on this machine finds it)
    and free ports; a node is killed, and cleaned up, by its process group and session only.

        cluster = LocalCluster(log_dir, workers=1, num_cpus=1)
        cluster.start()    # returns once every node is alive
        cluster.kill("worker")
        cluster.stop()
    """

    def __init__(self, log_dir, workers=1, num_cpus=1, env=None):
        import ray

        self.log_dir, self.workers, self.num_cpus = str(log_dir), workers, num_cpus
        self.address = ray.util.get_node_ip_address()  # the machine's own: no traffic leaves it
        self.env = cluster_environment(**(env or {}))
        self.nodes, self.temp_dirs, self.temp_dir = {}, [], {}  # temp_dir: each node's, by role

    def _start(self, role, options):
        # Short temp dirs: Ray's Unix socket paths must stay under ~100 characters.
        temp_dir = tempfile.mkdtemp(prefix=f"ray-{role}-", dir="/tmp")
        self.temp_dirs.append(temp_dir)
        self.temp_dir[role] = temp_dir
        with open(os.path.join(self.log_dir, f"{role}.log"), "w") as log:
            self.nodes[role] = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", "--num-cpus", str(self.num_cpus),
                 "--object-store-memory", str(300 * 1024 * 1024), "--temp-dir", temp_dir, *options, *_node_ports()],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def log(self, role) -> str:
        """The end of a node's `ray start` output."""
        with open(os.path.join(self.log_dir, f"{role}.log")) as handle:
            return handle.read()[-3000:]

    def _wait_for_runtime(self, role, deadline):
        """Until the node's `ray start` says its runtime started, or it exits: a read of its
        log, where each `ray list` costs a second of CPU."""
        path = os.path.join(self.log_dir, f"{role}.log")
        while time.time() < deadline and self.nodes[role].poll() is None:
            with open(path) as handle:
                if "Ray runtime started." in handle.read():
                    return
            time.sleep(0.2)

    def _start_head(self, deadline):
        """The head, up to three times with fresh ports: a port found free may be taken by
        another process before Ray binds it, and then `ray start` exits at once."""
        for attempt in range(3):
            self.port, self.dashboard_port = free_port(), free_port()
            self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
            self._start("head", ["--head", "--port", str(self.port), "--include-dashboard", "true",
                                 "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port),
                                 "--ray-client-server-port", str(free_port())])
            self._wait_for_runtime("head", deadline)
            while time.time() < deadline and self.nodes["head"].poll() is None:
                if self.state("nodes", quiet=True):
                    return
                time.sleep(1)
            if self.nodes["head"].poll() is None:
                return  # still starting at the deadline: start() reports that the cluster did not form
            failed = self.log("head")
            self.kill("head")
            os.replace(os.path.join(self.log_dir, "head.log"), os.path.join(self.log_dir, f"head-attempt{attempt}.log"))
        raise AssertionError(f"the head exited three times; the last time:\n{failed}")

    def start(self, timeout=120):
        deadline = time.time() + timeout
        self._start_head(deadline)
        for number in range(self.workers):
            self._start("worker" if number == 0 else f"worker{number}", ["--address", f"{self.address}:{self.port}"])
        for role in list(self.nodes):
            self._wait_for_runtime(role, deadline)
        while time.time() < deadline and len(self.alive_nodes()) < 1 + self.workers:
            assert all(node.poll() is None for node in self.nodes.values()), "a node exited: see its log"
            time.sleep(1)
        assert len(self.alive_nodes()) == 1 + self.workers, f"the cluster did not form in {timeout} s"

    def state(self, kind, *options, quiet=False):
        """`ray list KIND` against the head's dashboard, as JSON."""
        result = subprocess.run(
            [RAY, "list", kind, "--address", self.dashboard, "--format", "json", "--limit", "10000", *options],
            env=self.env, capture_output=True, text=True, timeout=120,
        )
        try:
            if result.returncode:
                raise ValueError(result.stderr[-2000:])
            return json.loads(result.stdout)
        except ValueError:  # the dashboard is not up yet, or answered with a message
            if quiet:
                return []
            raise

    def runs(self, role, pid) -> bool:
        """Whether process `pid` is one of node `role`'s (in its session): no `ray list`."""
        try:
            return os.getsid(pid) == self.nodes[role].pid
        except (ProcessLookupError, KeyError):
            return False

    def alive_nodes(self):
        return {node["node_id"]: node["is_head_node"] for node in self.state("nodes", quiet=True) if node["state"] == "ALIVE"}

    def kill(self, role):
        """SIGKILL a node's process group, then whatever of its session left the group."""
        import psutil

        node = self.nodes.pop(role)
        try:
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()
        for process in psutil.process_iter():
            try:
                if os.getsid(process.pid) == node.pid:
                    process.kill()
            except (psutil.Error, ProcessLookupError):
                pass

    def stop(self):
        for role in list(self.nodes):
            self.kill(role)
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Runs and bundles.


def tiny_run_dir(path: pathlib.Path, model=None) -> str:
    """A finished run as training leaves it (model.keras, metrics.json, config.json), of a
    16-pixel, two-class tf_keras model: a real bundle in a second, for checks that need no
    trained weights."""
    import tf_keras as keras

    if model is None:
        inputs = keras.Input((16, 16, 3), name="image")
        x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(inputs))
        model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="predictions")(x))
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / "model.keras")
    metrics = {"model": "cnn1", "image_size": 16, "class_names": ["a", "b"], "test": {"top1": 0.5}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    (path / "config.json").write_text(json.dumps({"train": {"model": "cnn1"}}))
    return str(path)


@pytest.fixture
def tiny_bundle_dir(tmp_path) -> pathlib.Path:
    """`tiny_run_dir` exported as a bundle."""
    from dogbreeds.export import export_bundle

    export_bundle(tiny_run_dir(tmp_path / "run"), str(tmp_path / "bundle"))
    return tmp_path / "bundle"


def readme_commands(blocks="bash") -> list[str]:
    """Every `.venv/bin/dogbreeds` command in the README's bash blocks (or `sh` ones: the
    serving commands, which run until Ctrl-C or need a run first), in order, without that
    prefix (and without the quick start's set-up)."""
    commands = []
    for block in re.findall(rf"```{blocks}\n(.*?)```", README.read_text(), re.S):
        for line in block.strip().splitlines():
            line = line.removeprefix(README_SETUP)
            if line.startswith(".venv/bin/dogbreeds "):
                commands.append(line.removeprefix(".venv/bin/dogbreeds "))
    return commands


def serving_command(prefix: str) -> str:
    """The one line of the README's Serving section (its `sh` blocks) that starts with `prefix`."""
    section = README.read_text().split("## Serving", 1)[-1].split("\n## ", 1)[0]
    lines = [line.strip() for block in re.findall(r"```sh\n(.*?)```", section, re.S)
             for line in block.strip().splitlines()]
    matches = [line for line in lines if line.startswith(prefix)]
    assert len(matches) == 1, f"the README's Serving section needs one `{prefix}` command: {lines}"
    return matches[0]


def run_readme_curl(port: int) -> dict:
    """The README's `curl -F ...` against 127.0.0.1:`port`: its JSON answer."""
    curl = serving_command("curl -F ").replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    result = subprocess.run(shlex.split(curl) + ["--silent", "--show-error", "--max-time", "120"],
                            cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def listener(port: int) -> str:
    """The name of the process listening on 127.0.0.1:port."""
    import psutil

    (pid,) = {c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
    return psutil.Process(pid).name()


def run_readme_command(command: str, runs: pathlib.Path) -> None:
    """A README command as written, from the project's root, its `runs/` moved to `runs`; it
    exits 0 and writes every `--output` it names."""
    from dogbreeds import cli

    argv = [arg.replace("runs/", f"{runs}/") for arg in shlex.split(command)]
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        assert cli.main(argv) == 0
    finally:
        os.chdir(here)
    for output in re.findall(r"--output runs/(\S+)", command):
        assert (runs / output).exists()


@pytest.fixture(scope="session")
def readme_runs(tmp_path_factory) -> pathlib.Path:
    """The README's `runs/`, shared by its commands as it is for a reader."""
    return tmp_path_factory.mktemp("readme") / "runs"


def _readme_run(prefix: str, runs: pathlib.Path, blocks="bash") -> pathlib.Path:
    """Run the README's one command that starts with `prefix`, as written; its output folder."""
    (command,) = [command for command in readme_commands(blocks) if command.startswith(prefix)]
    run_readme_command(command, runs)
    return runs / re.search(r"--output runs/(\S+)", command).group(1)


# README commands whose runs other tests check too: each runs once for the session, by the
# fixture named here, whichever test asks first (tests/test_readme.py asks for it by name).
README_RUN_FIXTURES = {
    "pipeline --profile quick ": "quick_pipeline_dir",
    "pipeline --resume ": "quick_pipeline_extended",
    "train mobilenet_025 ": "mobilenet_run_dir",
    "train cnn3v2 ": "cnn3v2_run_dir",
    "search cnn3v2 ": "readme_search_cnn3v2_dir",
    "search head ": "readme_search_head_dir",
    "bench heads ": "readme_bench_heads",
    "pipeline --profile full ": "rehearsal",
}
# README commands of the long tier (`pytest -m long`): minutes each, covered by no faster test
# (the quick pipeline, its extension and the benchmark of its bundle; the rehearsal).
LONG_README_RUNS = ("pipeline --profile quick ", "pipeline --resume ", "bench novelty runs/quick/", "pipeline --profile full ")


@pytest.fixture(scope="session")
def quick_pipeline_dir(readme_runs) -> pathlib.Path:
    """The README's main command, `dogbreeds pipeline --profile quick ... --output runs/quick`,
    run as a reader runs it (its own process and Ray); what it printed is kept beside it in
    `quick.console`. tests/test_readme.py checks its artefacts, its output, its dashboard and
    its extension."""
    (command,) = [command for command in readme_commands() if command.startswith("pipeline --profile quick ")]
    argv = [arg.replace("runs/", f"{readme_runs}/") for arg in shlex.split(command)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "dogbreeds", *argv], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    (readme_runs / "quick.console").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    return readme_runs / "quick"


@pytest.fixture(scope="session")
def quick_pipeline_extended(ray_cluster, quick_pipeline_dir, readme_runs) -> dict:
    """The README's `dogbreeds pipeline --resume --set head.trials=6 ... --output runs/quick`,
    run on the quick pipeline; returns what the pipeline held before: each search's results.csv
    rows, best.json and its final/metrics.json's mtime."""
    before = {}
    for stage in ("cnn3v2", "head", "fine_tune"):
        search_dir = quick_pipeline_dir / stage
        with open(search_dir / "results.csv") as handle:
            rows = list(csv.DictReader(handle))
        before[stage] = {"rows": rows, "best": json.loads((search_dir / "best.json").read_text()),
                         "final": (search_dir / "final" / "metrics.json").stat().st_mtime_ns}
    _readme_run("pipeline --resume ", readme_runs)
    return before


@pytest.fixture(scope="session")
def mobilenet_run_dir(ray_cluster, readme_runs) -> str:
    """The README's `dogbreeds train mobilenet_025 ... --output runs/mobilenet` (the real
    backbone, 5 epochs at 128 px on tiny_dogs_64, one worker): tests/test_train.py checks it
    against training from scratch; the serving, attack and novelty tests export it, as the
    README's `dogbreeds export runs/mobilenet` does."""
    return str(_readme_run("train mobilenet_025 ", readme_runs))


@pytest.fixture(scope="session")
def cnn3v2_run_dir(ray_cluster, readme_runs) -> pathlib.Path:
    """The README's `dogbreeds train cnn3v2 ... --output runs/cnn3v2` (8 epochs at 64 px on two
    workers): tests/test_train.py checks it, the report renders it, novelty exports it; tests
    may add files to it but change none."""
    return _readme_run("train cnn3v2 ", readme_runs)


@pytest.fixture(scope="session")
def readme_search_cnn3v2_dir(ray_cluster, readme_runs) -> pathlib.Path:
    """The README's `dogbreeds search cnn3v2 ... --output runs/search_cnn3v2` (2 trials of 2
    epochs at 32 px): tests/test_search.py checks what it wrote."""
    return _readme_run("search cnn3v2 ", readme_runs)


@pytest.fixture(scope="session")
def readme_search_head_dir(ray_cluster, readme_runs) -> pathlib.Path:
    """The README's `dogbreeds search head ... --output runs/search_head` (4 trials on the
    features of one view at 96 px): tests/test_search.py checks it and reuses its features."""
    return _readme_run("search head ", readme_runs)


@pytest.fixture(scope="session")
def readme_bench_heads(readme_runs) -> dict:
    """The README's `dogbreeds bench heads ... --output runs/bench` (one trial of one epoch at
    64 px): the JSON it wrote."""
    return json.loads((_readme_run("bench heads ", readme_runs) / "bench_heads.json").read_text())


@pytest.fixture(scope="session")
def rehearsal(readme_runs) -> dict:
    """The README's full-profile rehearsal (`dogbreeds pipeline --profile full ... --output
    runs/rehearsal`) as a user runs it: a process of its own, which starts a local Ray on this
    machine's cores. Returns its folder, its seconds and the peak resident memory of each of
    its processes, sampled every second (also in test-artifacts/rehearsal_memory.json)."""
    import psutil

    (command,) = [c for c in readme_commands() if c.startswith("pipeline --profile full ")]
    argv = [arg.replace("runs/", f"{readme_runs}/") for arg in shlex.split(command)]
    started = time.time()
    process = subprocess.Popen([sys.executable, "-m", "dogbreeds", *argv], cwd=ROOT, start_new_session=True)
    root, peaks = psutil.Process(process.pid), {}
    while process.poll() is None:
        if time.time() - started > 40 * 60:  # 6 minutes in CI, about 16 on a slow day: something hangs
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the rehearsal ran for 40 minutes: {peaks}")
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            tree = []
        for member in tree:
            try:
                rss, title = member.memory_info().rss, " ".join(member.cmdline())[:100]
            except psutil.Error:
                continue
            now = round(time.time() - started)
            peak = peaks.setdefault(member.pid, {"mb": 0, "process": title, "from_s": now})
            peak.update(mb=max(peak["mb"], round(rss / 2**20)), process=title, to_s=now)
        time.sleep(1)
    result = {"seconds": round(time.time() - started, 1), "returncode": process.returncode,
              "peak_rss_mb": sorted(({"pid": pid, **peak} for pid, peak in peaks.items()), key=lambda p: -p["mb"])}
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "rehearsal_memory.json").write_text(json.dumps(result, indent=1))
    assert process.returncode == 0, result
    return {**result, "dir": readme_runs / "rehearsal"}


@pytest.fixture(scope="session")
def mobilenet_bundle_dir(mobilenet_run_dir, readme_runs) -> str:
    """The README's `dogbreeds export runs/mobilenet --output runs/bundle`: the bundle the
    serving, attack and novelty tests serve (read-only for them)."""
    return str(_readme_run("export runs/mobilenet ", readme_runs, blocks="sh"))


def finished_in_tune_state(search_dir, experiment="search") -> set[str]:
    """Trial ids that Tune's own saved state of a search's `experiment` records as finished."""
    states = sorted((search_dir / "tune" / experiment).glob("experiment_state-*.json"))
    if not states:
        return set()
    try:
        trials = [json.loads(t[0]) for t in json.loads(states[-1].read_text())["trial_data"]]
    except (ValueError, KeyError):  # being written
        return set()
    return {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}


def assert_study_holds(search_dir, trial_ids) -> None:
    """The search's Optuna study (dogbreeds/study.py) holds each of its Tune trials `trial_ids`
    exactly once as a finished trial, and nothing is left running."""
    from dogbreeds import study

    record = study.load(str(search_dir), "search")
    assert not [t.number for t in record.trials if not t.state.is_finished()]
    finished = [t.user_attrs["ray_trial_id"] for t in record.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert sorted(finished) == sorted(trial_ids), (finished, trial_ids)


def dashboard_studies(port: int) -> dict[str, list[dict]]:
    """What `dogbreeds dashboard` on 127.0.0.1:`port` lists, through optuna-dashboard's HTTP
    API: each study's name -> its trials (JSON: state, params, intermediate values, user attrs,
    note, study_id)."""
    api = f"http://127.0.0.1:{port}/api/studies"
    studies = {}
    for summary in json.loads(urllib.request.urlopen(api, timeout=30).read())["study_summaries"]:
        detail = json.loads(urllib.request.urlopen(f"{api}/{summary['study_id']}?after=0", timeout=30).read())
        studies[summary["study_name"]] = detail["trials"]
    return studies
