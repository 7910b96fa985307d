"""metrics.csv (one row per epoch) and summary.json, rewritten whole and atomically each time."""

from __future__ import annotations

import csv
import io
import json

from expcuda.train.atomic import write_text

COLUMNS = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc", "test_acc_lp", "test_top5",
           "test_top5_lp", "f", "lr", "images_per_s", "data_wait", "epoch_time",
           # Zhuang et al.'s methods (expcuda.train.methods), empty when not used
           "stage", "sp_fraction", "twin_test_acc", "twin_test_loss")


def write_csv(path: str, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in COLUMNS})
    write_text(path, buf.getvalue())


def read_csv(path: str) -> list[dict]:
    """Rows of any of our CSV files, numbers parsed."""
    with open(path) as fh:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def write_json(path: str, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: str) -> dict:
    with open(path) as fh:
        return json.load(fh)


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # full precision: resumed and uninterrupted runs compare exactly
    return v


def _parse(v: str):
    if v == "":
        return None
    try:
        return int(v)
    except ValueError:
        return float(v)
