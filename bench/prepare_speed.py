"""How long `emotrain prepare` takes on an IEMOCAP-sized release (synthetic, same layout).

    python bench/prepare_speed.py --utterances-per-session 1106 --workers 1 2

Writes a synthetic release with IEMOCAP's durations (5 x 1106 = 5,530 4-class utterances, about
7 h of audio) into a temporary folder, prepares it with each worker count, and prints a table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from emotrain.data.prepare import prepare
from emotrain.data.synth import synthesize_release


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--utterances-per-session", type=int, default=1106)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--audio-format", default="flac")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="emotrain-prepare-bench-"))
    try:
        started = time.perf_counter()
        summary = synthesize_release(work / "release", seed=0, utterances_per_session=args.utterances_per_session)
        hours = summary["four_class_seconds"] / 3600
        print(f"synthesised {summary['utterances']} wavs ({hours:.2f} h kept) in {time.perf_counter() - started:.1f} s")
        print("| workers | utterances | audio (h) | seconds | audio h per minute |")
        print("| ---: | ---: | ---: | ---: | ---: |")
        for workers in args.workers:
            out = work / f"prepared-{workers}"
            started = time.perf_counter()
            report = prepare(work / "release", out, workers=workers, audio_format=args.audio_format)
            elapsed = time.perf_counter() - started
            print(f"| {workers} | {report['kept']} | {hours:.2f} | {elapsed:.1f} | {hours / elapsed * 60:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
