"""Measuring the server under attack: the memory of its Serve processes (`MemorySampler`)
and what its answers give away (`leak_tests`, `find_leaks`, the paths an answer names)."""

from __future__ import annotations

import ast
import collections
import json
import os
import re
import threading
import time
from typing import Callable, Optional

from dogbreeds.attack.inputs import HostileInput

# The Serve processes whose memory is sampled: a substring of the process title -> role.
ROLES = {"ServeReplica:{app}:Classifier": "classifier", "ServeReplica:{app}:Ingress": "ingress",
         "ProxyActor": "proxy", "haproxy": "proxy", "dogbreeds serve": "front", "dogbreeds.cli serve": "front"}
# Memory samples per second; the 500-frame GIF's peak lasts seconds, not milliseconds.
SAMPLES_PER_S = 10
# An absolute filesystem path in an answer: two components or more, not part of a URL.
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?:[^\s'\"\\<>|,;()\[\]{}/]+/)+[^\s'\"\\<>|,;()\[\]{}/]*")
# The same in quotes, where it may hold spaces (Gradio's errors quote the file they read).
QUOTED_PATH = re.compile(r"'(/[^'\n]+/[^'\n]+)'|\"(/[^\"\n]+/[^\"\n]+)\"")


def serve_processes(port: int, app_name: str = "dogbreeds", server_pid: Optional[int] = None) -> dict:
    """The Serve processes of the server on `port`, {pid: (role, psutil.Process)}: the
    descendants of `server_pid` (a `dogbreeds serve`, its front included), else of the raylet
    above the process listening on the port or of that process (`dogbreeds serve`'s front), else
    every matching process of this machine."""
    import psutil

    root = psutil.Process(server_pid) if server_pid else None
    if root is None:
        for connection in psutil.net_connections("tcp"):
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port and connection.pid:
                listener = psutil.Process(connection.pid)
                root = next((process for process in listener.parents() if process.name() == "raylet"), listener)
    candidates = [root, *root.children(recursive=True)] if root else psutil.process_iter()
    roles = {key.format(app=app_name): role for key, role in ROLES.items()}
    found = {}
    for process in candidates:
        try:
            title = " ".join(process.cmdline()) or process.name()
        except psutil.Error:
            continue
        role = next((role for key, role in roles.items() if key in title), None)
        if role:
            found[process.pid] = (role, process)
    return found


class MemorySampler(threading.Thread):
    """Peak RSS per role of the Serve processes, sampled `SAMPLES_PER_S` times a second; the
    process list is refreshed every 2 s (a replica that dies is replaced by a new process).

    `kill_above_mb`: a process past it is killed (Serve replaces a replica), so that a server
    the caller started cannot take the machine down; None: never."""

    def __init__(self, port: int, app_name: str, server_pid: Optional[int], kill_above_mb: Optional[float] = None):
        super().__init__(daemon=True)
        self.port, self.app_name, self.server_pid = port, app_name, server_pid
        self.kill_above_mb = kill_above_mb
        self.killed: list[dict] = []
        self.peak_mb: dict[str, float] = {}  # over the whole run
        self.window_mb: dict[str, float] = {}  # since `start_window`
        self.current_mb: dict[str, float] = {}  # the last sample
        self.pids: dict[str, set] = collections.defaultdict(set)
        self.stopping = threading.Event()

    def start_window(self) -> None:
        self.window_mb = dict(self.current_mb)

    def run(self) -> None:
        import psutil

        processes, refreshed = {}, 0.0
        while not self.stopping.is_set():
            if time.monotonic() - refreshed > 2:
                processes, refreshed = serve_processes(self.port, self.app_name, self.server_pid), time.monotonic()
                for pid, (role, _) in processes.items():
                    self.pids[role].add(pid)
            current = {}
            for role, process in processes.values():
                try:
                    megabytes = process.memory_info().rss / 2**20
                    current[role] = max(current.get(role, 0.0), megabytes)
                    if self.kill_above_mb and megabytes > self.kill_above_mb:
                        process.kill()
                        self.killed.append({"role": role, "pid": process.pid, "rss_mb": round(megabytes)})
                except psutil.Error:
                    pass
            self.current_mb = current
            for role, megabytes in current.items():
                self.peak_mb[role] = max(self.peak_mb.get(role, 0.0), megabytes)
                self.window_mb[role] = max(self.window_mb.get(role, 0.0), megabytes)
            self.stopping.wait(1 / SAMPLES_PER_S)

    def stop(self) -> None:
        self.stopping.set()
        self.join()


# ---------------------------------------------------------------------------------------------
# Leaks.


def leak_tests(token: str, bundle_dir: str) -> dict[str, Callable[[bytes], bool]]:
    """What must never appear in an answer, by name: a test on a body."""
    found = {"canary_token": lambda body: token.encode() in body}
    try:
        with open("/etc/passwd", "rb") as handle:
            first_line = handle.readline().strip()
        found["etc_passwd"] = lambda body: first_line in body
    except OSError:
        pass
    try:
        with open("/etc/hostname", "rb") as handle:
            hostname = handle.read().strip()
        # A short one ("vm") may appear in any answer by chance: then only the file itself counts.
        found["etc_hostname"] = lambda body: hostname in body if len(hostname) >= 8 else body.strip() == hostname
    except OSError:
        pass
    environ = re.compile(rb"(?:^|\x00)(?:PATH|HOME|PWD|HOSTNAME)=[^\x00\n]*\x00")  # NUL-separated pairs
    found["proc_environ"] = lambda body: environ.search(body) is not None
    model = os.path.join(bundle_dir, "model.keras")
    if os.path.isfile(model):
        with open(model, "rb") as handle:
            handle.seek(os.path.getsize(model) // 2)
            model_bytes = handle.read(64)
        found["model_keras"] = lambda body: model_bytes in body
    return found


def _strings(value) -> list[str]:
    """Every string of a JSON document, keys included."""
    if isinstance(value, dict):
        return [text for key, item in value.items() for text in _strings(key) + _strings(item)]
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return [value] if isinstance(value, str) else []


def named_paths(bodies: list[tuple[str, bytes]]) -> list[str]:
    """Absolute paths an answer names (a Gradio error names its cached copy of a file)."""
    texts = []
    for _, body in bodies:
        for line in body.decode("utf-8", "replace").splitlines():
            try:  # event-stream data is JSON: its strings, unescaped
                texts += _strings(json.loads(line.removeprefix("data:").strip()))
            except ValueError:
                texts.append(line)
    found = []
    for text in texts:
        quoted = [single or double for single, double in QUOTED_PATH.findall(text)]
        for path in [path for path in quoted if "\\" in path]:
            try:  # Python's repr of a name (Pillow's errors) escapes what it cannot print
                quoted.insert(0, ast.literal_eval(f"'{path}'"))
            except (ValueError, SyntaxError):
                pass
        for path in quoted + ABSOLUTE_PATH.findall(text):
            path = path.split("file=", 1)[-1]
            if path not in found:
                found.append(path)
    return found


def absolute_paths(body: bytes) -> list[str]:
    """The absolute paths among a JSON answer's strings."""
    try:
        document = json.loads(body)
    except ValueError:
        return []
    return [path for text in _strings(document) for path in ABSOLUTE_PATH.findall(text)]


def find_leaks(case: HostileInput, result: dict, secret_tests: dict) -> list[dict]:
    """What the case's answers gave away, or what it wrote where it must not."""
    leaks = [{"case": case.name, "secret": name, "where": where}
             for where, body in result["bodies"] for name, test in secret_tests.items() if test(body)]
    if case.no_absolute_paths:
        paths = sorted({path for _, body in result["bodies"] for path in absolute_paths(body)})
        if paths:
            leaks.append({"case": case.name, "secret": "absolute_paths", "where": paths[:10]})
    if case.must_not_echo and any(case.must_not_echo in body for _, body in result["bodies"]):
        leaks.append({"case": case.name, "secret": "echoed", "where": case.must_not_echo.decode("latin-1")})
    if case.must_not_create and os.path.exists(case.must_not_create):
        leaks.append({"case": case.name, "secret": "file_written", "where": case.must_not_create})
        os.remove(case.must_not_create)
    return leaks
