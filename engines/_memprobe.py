"""Peak resident memory of one engine run, measured in a fresh process.

``python -m mixrank.engines._memprobe ENGINE ARTIFACT BATCH SETTINGS_JSON [SEQ_LEN]`` loads
the artifact with the registered runner, runs one batch of random inputs (a text model's
at SEQ_LEN tokens) and prints
``{"peak_rss_bytes", "baseline_rss_bytes"}`` as JSON. `peak_rss` runs it, so that runs
do not contaminate each other's high-water mark. Works for every registered engine.
"""

from __future__ import annotations

import json
import sys


def _status(key: str) -> int:
    """A field of /proc/self/status in bytes (VmHWM is this process image's peak;
    ru_maxrss would survive exec from the parent)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def main(argv: list[str]) -> int:
    engine, path, batch, settings_json = argv[:4]
    base = _status("VmRSS")
    from mixrank.engines.runners import make_runner, random_feeds  # after the baseline: it loads the engine

    runner = make_runner(engine, path, json.loads(settings_json))
    seq = {"seq_len": int(argv[4])} if len(argv) > 4 else {}
    runner.infer(random_feeds(runner, int(batch), strict=False, **seq))
    runner.synchronize()
    print(json.dumps({"peak_rss_bytes": _status("VmHWM"), "baseline_rss_bytes": base, **runner.memory()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
