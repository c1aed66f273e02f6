"""Readers for the knowledge-editing data sets (zsRE, CounterFact) into one record type.

Each record is a fact to teach (``prompt + " " + target``) with the paraphrase that tests generalisation and an
unrelated prompt/answer pair that tests locality. The files are read by path; nothing is copied or downloaded.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Union

FORMATS = ("zsre", "counterfact")


@dataclass(frozen=True)
class EditRecord:
    prompt: str
    target: str
    rephrase: str
    loc_prompt: str
    loc_answer: str
    subject: str = ""
    original: str = ""  # the answer before the edit (zsRE answers[0], CounterFact ground_truth)

    @property
    def text(self) -> str:
        """The text that is taught: ``prompt + " " + target``."""
        return f"{self.prompt} {self.target}"

    def to_dict(self) -> dict:
        return asdict(self)


def _zsre(row: dict) -> EditRecord:
    answers = row.get("answers") or [""]
    return EditRecord(prompt=row["src"], target=row["alt"], rephrase=row["rephrase"], loc_prompt=row["loc"],
                      loc_answer=row["loc_ans"], subject=row.get("subject", ""), original=str(answers[0]))


def _counterfact(row: dict) -> EditRecord:
    return EditRecord(prompt=row["prompt"], target=row["target_new"], rephrase=row["rephrase_prompt"],
                      loc_prompt=row["locality_prompt"], loc_answer=row["locality_ground_truth"],
                      subject=row.get("subject", ""), original=row.get("ground_truth", ""))


def detect_format(path: Union[str, Path]) -> str:
    with open(path, encoding="utf-8") as f:
        row = json.loads(f.readline())
    if "src" in row and "alt" in row:
        return "zsre"
    if "prompt" in row and "target_new" in row:
        return "counterfact"
    raise ValueError(f"{path}: cannot tell the format from its fields {sorted(row)}; pass --format")


def load_records(path: Union[str, Path], fmt: str | None = None, n: int | None = None,
                 seed: int | None = None) -> list[EditRecord]:
    """Read ``n`` records (all when ``None``) of a zsRE or CounterFact JSONL file.

    Records whose fields are missing or empty are skipped. With ``seed`` the ``n`` records are a seeded random
    sample (in file order); without it, the first ``n``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    fmt = fmt or detect_format(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    convert = _zsre if fmt == "zsre" else _counterfact
    records: list[EditRecord] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = convert(json.loads(line))
            except (KeyError, json.JSONDecodeError) as err:
                raise ValueError(f"{path}:{lineno}: not a {fmt} record ({err!r})") from err
            fields = (rec.prompt, rec.target, rec.rephrase, rec.loc_prompt, rec.loc_answer)
            if all(isinstance(x, str) and x.strip() for x in fields):
                records.append(rec)
    if n is not None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if seed is not None and n < len(records):
            keep = sorted(random.Random(seed).sample(range(len(records)), n))
            records = [records[i] for i in keep]
        else:
            records = records[:n]
    return records
