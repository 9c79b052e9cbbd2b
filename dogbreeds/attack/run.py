"""The run: every case sent in turn, a probe after each, each case judged, then the JSON of
`dogbreeds bench attack` (`run_attack`, `summarize`)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import shutil
import tempfile
import time
from typing import Callable, Optional
from urllib.parse import urlsplit

from dogbreeds.attack.inputs import SLOW_GRACE_S, HostileInput, hostile_inputs
from dogbreeds.attack.measure import MemorySampler, find_leaks, leak_tests
from dogbreeds.attack.send import (BODY_READ_S, MAX_FILE_FETCHES, NO_ANSWER, Target, case_result, send_case,
                                   send_probe)

# Consecutive failed probes after which the service counts as down and the run stops.
FAILED_PROBES_TO_STOP = 3


def write_canaries(folder: str, token: str) -> dict[str, str]:
    """Files only the runner knows, holding `token`: one plainly named, one with a unicode
    name (accents, an emoji, CJK, a right-to-left override)."""
    canaries = {"plain": os.path.join(folder, "canary.txt"),
                "unicode_name": os.path.join(folder, "żółw \U0001F415 名前 \u202etxt.jpg")}
    for path in canaries.values():
        with open(path, "w") as handle:
            handle.write(f"canary {token}\n")
    return canaries


def _detail_problem(result: dict) -> Optional[str]:
    """A 4xx answer of /predict must be JSON {"detail": "<a string>"}."""
    (status,), ((_, body),) = result["statuses"], result["bodies"]
    if not 400 <= status < 500:
        return None
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, KeyError, TypeError):
        return f"not JSON with a detail: {body[:200]!r}"
    return None if isinstance(detail, str) and detail else f"detail is not a string: {detail!r:.200}"


def _judge(case: HostileInput, result: dict, probe: tuple[int, float], seconds: float, window_mb: dict) -> dict:
    """The record of one case: its deciding status, whether it was acceptable, the probe."""
    statuses = result["statuses"]
    wrong = [status for status in statuses if status not in case.acceptable]
    problem = result["problem"]
    if case.detail_string and not wrong and problem is None:
        problem = _detail_problem(result)
    # A 5xx the case accepts (503 "busy" to a slow client) is an answer, not an error.
    errors = [status for status in wrong + result["other_statuses"] if status >= 500]
    record = {
        "name": case.name,
        "kind": case.kind,
        "status": wrong[0] if wrong else collections.Counter(statuses).most_common(1)[0][0],
        "acceptable": not wrong and not errors and problem is None,
        "seconds": round(seconds, 3),
        "probe_status": probe[0],
        "probe_seconds": probe[1],
        "classifier_peak_mb": round(window_mb.get("classifier", 0.0)),
    }
    if len(statuses) > 1:
        record["statuses"] = {str(status): count for status, count in sorted(collections.Counter(statuses).items())}
    if problem:
        record["problem"] = problem
    if errors:
        record["5xx"] = errors
    record |= {key: value for key, value in result.items()
               if key not in ("statuses", "bodies", "other_statuses", "problem")}
    return record


def _case_timeout(case: HostileInput, case_timeout_s: float, file_read_timeout_s: float) -> float:
    for slow in ("slow_bodies", "slow_headers"):
        if slow in case.request:
            return case.request[slow]["wait_s"] + 30
    if "file_read" in case.request or "gradio_photo" in case.request:
        # The call, its events and the fetches back; /dev/zero must be answered within it.
        return file_read_timeout_s + MAX_FILE_FETCHES * BODY_READ_S
    return case_timeout_s


async def _run_cases(target: Target, cases: list[HostileInput], sampler: Optional[MemorySampler],
                     secret_tests: dict, options: dict, progress: Optional[Callable[[dict], None]]) -> tuple:
    records, leaks, failed_probes = [], [], 0
    for number, case in enumerate(cases):
        if sampler:
            sampler.start_window()
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                send_case(target, case, options["file_read_timeout_s"], options["slow_probe_bound_s"]),
                _case_timeout(case, options["case_timeout_s"], options["file_read_timeout_s"]))
        except asyncio.TimeoutError:
            result = case_result([NO_ANSWER])
        seconds = time.perf_counter() - started
        probe = await send_probe(target)
        record = _judge(case, result, probe, seconds, sampler.window_mb if sampler else {})
        case_leaks = find_leaks(case, result, secret_tests)
        if case_leaks:
            record["acceptable"] = False
            record["leaks"] = [leak["secret"] for leak in case_leaks]
        leaks += case_leaks
        records.append(record)
        if progress:
            progress(record)
        failed_probes = 0 if probe[0] == 200 else failed_probes + 1
        if failed_probes >= FAILED_PROBES_TO_STOP:
            return records, leaks, [later.name for later in cases[number + 1:]]
    return records, leaks, []


def run_attack(url: str, bundle_dir: str, photo_path: str, *, server_pid: Optional[int] = None,
               app_name: str = "dogbreeds", max_upload_bytes: int = 10 * 1024 * 1024,
               request_timeout_s: float = 60.0, header_timeout_s: float = 10.0, case_timeout_s: float = 60.0, probe_timeout_s: float = 30.0,
               probe_bound_s: float = 10.0, file_read_timeout_s: float = 10.0, slow_clients: int = 300,
               flood_requests: int = 100, per_client_limit: int = 32, gif_frames: int = 500,
               huge_body_bytes: int = 200 * 1024 * 1024, names: Optional[list[str]] = None,
               kill_above_mb: Optional[float] = None, progress: Optional[Callable[[dict], None]] = None) -> dict:
    """Every hostile input against the server at `url` (a loopback address), each followed by
    the real photo at `photo_path`; the memory of the server's processes sampled meanwhile.

    The sizes and limits are the server's defaults (`request_timeout_s`, `header_timeout_s`:
    slow clients must be answered within them, plus `SLOW_GRACE_S`); `names`: only the cases whose name contains one
    of these; `progress` is called with each case's record. A probe slower than
    `probe_bound_s` counts in `slow_probes`. Stops early (`not_run`) when
    `FAILED_PROBES_TO_STOP` probes in a row fail: the service is down. `kill_above_mb`: see
    `MemorySampler` (only for a server the caller started)."""
    import httpx

    parts = _loopback_address(url)
    with open(photo_path, "rb") as handle:
        photo = handle.read()
    bundle_dir = os.path.abspath(bundle_dir)
    token = secrets.token_hex(16)
    canary_dir = tempfile.mkdtemp(prefix="dogbreeds-attack-")
    sampler = MemorySampler(parts.port, app_name, server_pid, kill_above_mb)
    sampler.start()
    started = time.perf_counter()
    try:
        canaries = write_canaries(canary_dir, token)
        cases = hostile_inputs(
            photo, bundle_dir, canaries, token, parts.hostname, _num_classes(url, probe_timeout_s), max_upload_bytes,
            gif_frames, huge_body_bytes, slow_clients, request_timeout_s + SLOW_GRACE_S, flood_requests,
            per_client_limit, header_timeout_s + SLOW_GRACE_S)
        cases = [case for case in cases if not names or any(name in case.name for name in names)]
        options = dict(case_timeout_s=case_timeout_s, file_read_timeout_s=file_read_timeout_s,
                       slow_probe_bound_s=probe_bound_s)

        async def attack():
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=case_timeout_s, limits=limits) as client:
                target = Target(url, parts.hostname, parts.port, client, photo, probe_timeout_s)
                return await _run_cases(target, cases, sampler, leak_tests(token, bundle_dir), options, progress)

        records, leaks, not_run = asyncio.run(attack())
    finally:
        sampler.stop()
        shutil.rmtree(canary_dir, ignore_errors=True)
    return summarize(url, bundle_dir, records, leaks, not_run, sampler, probe_bound_s, time.perf_counter() - started)


def _loopback_address(url: str):
    """`url` split (`urllib.parse.urlsplit`); a ValueError unless its host is a loopback address."""
    parts = urlsplit(url)
    if not parts.hostname or not parts.hostname.startswith("127."):
        raise ValueError(f"the attack only goes to loopback addresses (127.x.x.x): {url}")
    return parts


def _num_classes(url: str, timeout_s: float) -> int:
    """How many breeds the service at `url` knows (`GET /labels`); a ValueError if it is no
    dogbreeds service."""
    import httpx

    labels = httpx.get(f"{url}/labels", timeout=timeout_s)
    if labels.status_code != 200:
        raise ValueError(f"no dogbreeds service at {url}: GET /labels answered {labels.status_code}")
    return labels.json()["num_classes"]


def summarize(url: str, bundle_dir: str, records: list[dict], leaks: list[dict], not_run: list[str],
              sampler: MemorySampler, probe_bound_s: float, seconds: float) -> dict:
    """The JSON of `dogbreeds bench attack`."""
    counts = collections.Counter()
    for record in records:
        counts.update(record.get("statuses") and {int(k): v for k, v in record["statuses"].items()}
                      or {record["status"]: 1})
    errors = sum(len(record.get("5xx", [])) + (record["probe_status"] >= 500) for record in records)
    worst = max(records, key=lambda record: record["probe_seconds"], default=None)
    return {
        "benchmark": "attack",
        "url": url,
        "bundle": bundle_dir,
        "inputs_tried": len(records),
        "status_counts": {str(status): count for status, count in sorted(counts.items())},
        "5xx_count": errors,
        "unacceptable": [record["name"] for record in records if not record["acceptable"]],
        "probes_not_200": [record["name"] for record in records if record["probe_status"] != 200],
        "slow_probes": [record["name"] for record in records if record["probe_seconds"] > probe_bound_s],
        "worst_probe_seconds": worst["probe_seconds"] if worst else None,
        "worst_probe_after": worst["name"] if worst else None,
        "peak_rss_mb": {role: round(megabytes) for role, megabytes in sorted(sampler.peak_mb.items())},
        "processes_seen": {role: len(pids) for role, pids in sorted(sampler.pids.items())},
        "killed_for_memory": sampler.killed,
        "leaks": leaks,
        "not_run": not_run,
        "seconds": round(seconds, 1),
        "cases": records,
    }
