"""A stand-in for `emotrain train` (tests of `emotrain cv` that need no real training).

    python tests/fake_train.py train CONFIG [overrides...]

It resolves the config as `emotrain train` would, writes the run folder's config.yaml and a
metrics.json whose test UA is FAKE_UA[variant] + 0.01 * fold (with the data it "trained" on, as the
recipe records it: `RunFolder.write_metrics`), and exits 0. Environment:
FAKE_TRAIN_LOG=FILE appends one line per call ("<experiment> <fold> <seed>"); FAKE_TRAIN_FAIL=
<experiment>:<fold> exits 3 for that run; FAKE_TRAIN_WAIT=1 waits for SIGTERM after writing the
config, then exits 75 as a preempted run does.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from emotrain.config import LABEL_NAMES, load_config, save_config  # noqa: E402
from emotrain.data.folds import split_from_config  # noqa: E402
from emotrain.train.run_folder import RunFolder  # noqa: E402

FAKE_UA = {"fusion": 0.8, "audio": 0.5, "text": 0.6}


def main(argv: list[str]) -> int:
    assert argv[0] == "train", argv
    cfg = load_config(argv[1], argv[2:])
    out = Path(cfg.output_dir)
    save_config(cfg, out / "config.yaml")
    if log := os.environ.get("FAKE_TRAIN_LOG"):
        with open(log, "a") as handle:
            handle.write(f"{cfg.experiment} {cfg.data.fold} {cfg.train.seed} group={cfg.logging.group}\n")
    if os.environ.get("FAKE_TRAIN_FAIL") == f"{cfg.experiment}:{cfg.data.fold}":
        return 3
    if os.environ.get("FAKE_TRAIN_WAIT"):
        stopped = []
        signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
        (out / "waiting").write_text(str(os.getpid()))
        while not stopped:
            time.sleep(0.05)
        (out / "got-sigterm").write_text("saved")
        return 75
    ua = FAKE_UA[cfg.model.variant] + 0.01 * cfg.data.fold
    confusion = [[10 if i == j else 0 for j in range(4)] for i in range(4)]
    test = {"wa": ua, "ua": ua, "macro_f1": ua, "per_class_recall": dict.fromkeys(LABEL_NAMES, ua),
            "confusion": confusion, "n": 40, "n_skipped": 0}
    RunFolder(out).write_metrics({"validation": test, "test": test, "best_step": 1}, data_path=cfg.data.path,
                                 split=split_from_config(cfg.data, seed=cfg.train.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
