"""The run log: one JSON row per logged step (and per validation) in log.jsonl, step rows in log.csv.

On resume, rows past the resumed step (logged by the interrupted run after its last checkpoint)
are dropped, so every step appears once; a torn last line from a crash is dropped too.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from moegpt.atomic import write_text_atomic

CSV_FIELDS = ("step", "loss", "aux_loss", "z_loss", "lr", "batch_size", "tokens", "tokens_per_s", "mfu",
              "load_imbalance", "grad_norm", "val_loss")


def _rows_up_to(jsonl: Path, step: int) -> list[dict]:
    rows = []
    for line in jsonl.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line torn by the crash that made this resume necessary
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            rows.append(row)
    return rows


def _csv_text(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(r for r in rows if "loss" in r)
    return buf.getvalue()


class RunLog:
    def __init__(self, out: Path, resume_step: int | None):
        self.jsonl, self.csv = out / "log.jsonl", out / "log.csv"
        rows = _rows_up_to(self.jsonl, resume_step) if resume_step is not None and self.jsonl.exists() else []
        # Both files are rewritten from the JSONL rows kept, each atomically.
        write_text_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        write_text_atomic(self.csv, _csv_text(rows))
        self._jsonl_file = open(self.jsonl, "a")
        self._csv_file = open(self.csv, "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=CSV_FIELDS, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self._jsonl_file.write(json.dumps(row) + "\n")
        self._jsonl_file.flush()
        if "loss" in row:
            self._csv.writerow(row)
            self._csv_file.flush()

    def close(self) -> None:
        self._jsonl_file.close()
        self._csv_file.close()
