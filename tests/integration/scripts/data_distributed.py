"""Run under `accelerate launch` with 2 processes (see tests/integration/test_data_distributed.py).

argv: PREPARED_ROOT OUT_DIR. Each rank writes OUT_DIR/rank<k>.json with what it gathered and counted.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))  # the repo root: tests.toyset

from emotrain.config import LABEL_NAMES, DataConfig  # noqa: E402
from emotrain.data.evaluation import build_eval_dataloader, build_eval_datasets  # noqa: E402
from emotrain.data.folds import make_fold_split  # noqa: E402
from emotrain.data.plan import StreamSettings  # noqa: E402
from emotrain.data.stream import TrainStream  # noqa: E402
from tests.toyset import toy_processors  # noqa: E402


def main() -> None:
    root, out_dir = sys.argv[1], Path(sys.argv[2])
    accelerator = Accelerator()
    # A silent single-process run would pass every check below: refuse it.
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    rank = accelerator.process_index
    fe, tok = toy_processors()
    split = make_fold_split(root, 1, validation="fraction", validation_fraction=0.2, seed=0)
    validation, test = build_eval_datasets(split)
    result: dict = {"rank": rank, "world": accelerator.num_processes}

    # Evaluation: each rank its own part (budget batches dealt in turn, fillers to even them out),
    # gathered once; and the recipe's own evaluate() over the same loader.

    from emotrain.data.evaluation import FILLER_ID
    from emotrain.train.evaluation import evaluate

    for name, dataset in (("test", test), ("validation", validation)):
        loader = build_eval_dataloader(dataset, DataConfig(eval_max_batch_audio_seconds=2.0), feature_extractor=fe,
                                       tokenizer=tok, batch_size=4, rank=rank, world_size=2)
        mine = [(i, label) for batch in loader for i, label in zip(batch["ids"], batch["labels"].tolist())
                if i != FILLER_ID]
        gathered = gather_object(mine)
        result[name] = {"ids": [i for i, _ in gathered], "labels": [label for _, label in gathered],
                        "expected": sorted(dataset.ids), "batches": gather_object([len(loader)])}
        result[name]["expected_labels"] = dict(zip(dataset.ids, dataset.labels.tolist()))

        class Oracle(torch.nn.Module):  # predicts each utterance's true class: metrics must be perfect
            label_names = LABEL_NAMES

            def forward(self, **inputs):
                return type("Out", (), {"logits": torch.nn.functional.one_hot(self.labels.pop(0), 4).float()})()

        oracle = Oracle()
        oracle.labels = [batch["labels"] for batch in loader]
        metrics = evaluate(accelerator, oracle, loader)
        result[name]["oracle"] = {"n": metrics["n"], "ua": metrics["ua"], "n_skipped": metrics["n_skipped"]}

    # Real training streams over shards of different sizes: the plan gives both ranks the same
    # number of batches (a multiple of the accumulation), and each rank yields exactly that many.
    settings = StreamSettings(seed=1, batch_size=3, max_batch_audio_seconds=2.0, bucket_buffer_size=8,
                              shuffle_buffer_size=4, max_audio_seconds=1.0)
    stream = TrainStream(split, settings, feature_extractor=fe, tokenizer=tok, rank=rank, world_size=2,
                         accumulation=2)
    result["num_batches"] = gather_object([stream.num_batches(0)])
    ids = [i for batch in stream for i in batch["ids"]]
    result["yielded_batches"] = stream.position
    result["epoch_ids"] = ids
    result["train_ids"] = sorted(split.train_ids())
    result["step_utterances"] = stream.step_utterances(0).tolist()
    total = torch.tensor([len(ids)], dtype=torch.long)
    result["utterances_sum"] = int(accelerator.reduce(total, reduction="sum").item())

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
