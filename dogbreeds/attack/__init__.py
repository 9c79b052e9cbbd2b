"""The adversarial suite: hostile inputs thrown at a running `dogbreeds serve`.

    dogbreeds bench attack runs/bundle --output bench_attack.json

`hostile_inputs(...)` builds the attacks of issue 11 as named cases, each with its kind
(`predict`, `gradio`, `routes`, `headers`, `slow`), the request to send and the statuses a
hardened server may answer: decompression bombs (a PNG of zeros, a 999,999 x 1 strip, a
500-frame GIF of 4000 x 4000 frames), truncated, corrupt and polyglot files, what is not a
photo, spoofed content types, bad `k`, path-traversal, unicode and very long file names,
1,000 files per request, 200 MB JSON bodies, Gradio's file-reading API pointed at files of
the server, huge headers and a foreign `Host`, slow clients and a flood from one address.

`run_attack(url, bundle_dir, photo_path)` sends them one by one; after each it sends a real
photo (the probe) and records its status and latency, while a thread samples the memory of
the Serve processes. It answers a JSON-ready dict: every case's status and whether it was
acceptable, status counts, 5xx count, worst probe latency, peak RSS per process, and the
leaks found (a canary file's token, /etc/passwd, the model's bytes or an absolute path in
an answer). A status is an HTTP status, or `CLOSED` (0: the server closed the connection
without answering) or `NO_ANSWER` (-1: nothing within the case's time limit).

Only loopback addresses are ever contacted: the slow clients bind 127.0.0.2-127.0.0.9.

The package reads in the order of a run: `inputs` builds the cases and their hostile files,
`send` sends one case and the probe, `measure` samples memory and finds leaks in the answers,
`run` runs every case, judges each and summarizes.
"""

from dogbreeds.attack.inputs import (CLOSED, HostileInput, hostile_inputs, jpeg_claiming_size, large_progressive_photo,
                                     multipart, png_of_zeros)
from dogbreeds.attack.measure import absolute_paths, leak_tests, named_paths
from dogbreeds.attack.run import run_attack, summarize, write_canaries
from dogbreeds.attack.send import NO_ANSWER

__all__ = [
    "CLOSED", "NO_ANSWER", "absolute_paths", "hostile_inputs", "HostileInput", "jpeg_claiming_size",
    "large_progressive_photo", "leak_tests", "multipart", "named_paths", "png_of_zeros", "run_attack",
    "summarize", "write_canaries",
]
