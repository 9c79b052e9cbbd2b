"""`dogbreeds serve` shows what its replicas report (warnings, errors), not a line per request."""

import subprocess
import sys
import time
import urllib.request

from tests.conftest import free_port, tiny_run_dir


def test_replica_warnings_reach_the_console_and_requests_do_not(tmp_path):
    from dogbreeds.export import export_bundle

    bundle = tmp_path / "bundle"
    export_bundle(tiny_run_dir(tmp_path / "run"), str(bundle))
    port = free_port()
    # Three TensorFlow threads on one reserved CPU: the classifier replica warns at start-up.
    server = subprocess.Popen(
        [sys.executable, "-m", "dogbreeds.cli", "serve", str(bundle), "--port", str(port),
         "--tensorflow-threads", "3", "--cpus-per-replica", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
    )
    lines = []
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            line = server.stdout.readline()
            assert line, "dogbreeds serve ended:\n" + "".join(lines)
            lines.append(line)
            if "dogbreeds serve: http://" in line:
                break
        for _ in range(3):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=30) as answer:
                assert answer.status == 200
        time.sleep(2)  # what the requests would log has reached the console by now
    finally:
        server.terminate()
        rest, _ = server.communicate(timeout=120)
    output = "".join(lines) + rest
    warning = [line for line in output.splitlines() if "tensorflow_threads 3 > the replica's 1 CPUs" in line]
    assert warning and "Classifier" in warning[0], output
    assert "GET /healthz" not in output, output
