"""The `table2` experiment's results: plain-18/34 against ResNet-18/34 with option A on
ImageNet or an image folder (the paper's Table 2 and Figure 4).

The paper's Table 2 reports top-1 validation error with 10-crop testing, so each run's
final checkpoint is also scored that way (`evaluate.py --mode=ten_crop`); the curves and
the center-crop error are the in-training evaluations.
"""

from __future__ import annotations

from collections.abc import Sequence

from resnet_jax.experiments import error_tables
from resnet_jax.experiments.error_tables import cell, percent, spread
from resnet_jax.experiments.nets import Net
from resnet_jax.experiments.runs import RunResult

PAPER_KEY = "paper_table2_top1_10crop_error_percent"


def ten_crop_error(result: RunResult) -> float:
    """The run's final checkpoint, scored on its eval split with ten crops (a fraction)."""
    from resnet_jax.evaluate import evaluate_workdir

    run = result.run
    return evaluate_workdir(run.workdir, run.config.num_train_steps, mode="ten_crop")["error"]


def summarize(nets: Sequence[Net], results: Sequence[RunResult]) -> list[dict]:
    """`error_tables.summarize`'s records with each net's 10-crop top-1 error (%) over seeds
    beside the paper's Table 2 number."""
    records = error_tables.summarize(nets, results, paper_key=PAPER_KEY)
    by_name = {result.run.name: result for result in results}
    for record, net in zip(records, nets, strict=True):
        errors = [ten_crop_error(by_name[run.name]) for run in net.runs]
        record["ten_crop_error_percent"] = spread(percent(errors))
    return records


def markdown_table(records: Sequence[dict]) -> str:
    head = ["net", "shortcut", "params", "top-1 error, 10-crop (%)", "center crop (%)",
            "final train error (%)", "paper, Table 2 (%)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for record in records:
        paper = record[PAPER_KEY]
        cells = [
            record["net"], record["shortcut"], f"{record['params']:,}",
            cell(record["ten_crop_error_percent"]), cell(record["test_error_percent"]),
            cell(record["final_train_error_percent"]),
            "—" if paper is None else f"{paper:.2f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def setting_notes(nets: Sequence[Net]) -> str:
    """What the numbers are, and how far they are from the paper's setting."""
    config = nets[0].runs[0].config
    return error_tables.setting_notes(nets, "imagenet", (
        "Every ResNet shortcut is option A (identity, zero-padded where the width grows), as in "
        "the paper's Table 2. Top-1 error, 10-crop: the final checkpoint scored on the four "
        f"corners, the center and their flips of the {config.dataset.eval_resize}-resized images; "
        "center crop: the evaluation after the last iteration;"))
