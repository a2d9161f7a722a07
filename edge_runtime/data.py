"""Local training data: loading (JSONL / CSV / TSV, optionally .gz), SST-2, partitioning.

Record kinds (plain dicts):
- classification: {"text": str, "label": int}
- instruction:    {"instruction": str, "input": str, "output": str} (may carry "label" when cast
  from a classification set, so accuracy can still be measured)

Bad rows raise `DataError` naming `file:line` and what to fix.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # numpy is imported by the partition helpers only (an idle device never loads it)
    import numpy as np

SCHEMES = ("iid", "dirichlet", "quantity")
DEFAULT_TEMPLATE = ("Is the sentiment of this movie review positive or negative?\n"
                    "Review: {text}\nAnswer with one word.")
DEFAULT_LABEL_WORDS = ("negative", "positive")


class DataError(ValueError):
    """A data file or row is malformed; the message names file:line and the expected form."""


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def record_kind(rec: dict[str, Any]) -> str:
    """'classification' or 'instruction' for a validated record."""
    return "instruction" if "instruction" in rec else "classification"


def _normalise(row: dict[str, Any], where: str) -> dict[str, Any]:
    """Validate one raw row into a classification or instruction record."""
    if "sentence" in row and "text" not in row:  # GLUE column name
        row = {**row, "text": row.pop("sentence")}
    if "instruction" in row:
        ins, inp, out = row.get("instruction"), row.get("input", ""), row.get("output")
        if not isinstance(ins, str) or not ins.strip():
            raise DataError(f"{where}: 'instruction' must be a non-empty string, got {ins!r}")
        if inp is None:
            inp = ""
        if not isinstance(inp, str):
            raise DataError(f"{where}: 'input' must be a string, got {inp!r}")
        if not isinstance(out, str) or not out.strip():
            raise DataError(f"{where}: 'output' must be a non-empty string, got {out!r}")
        rec: dict[str, Any] = {"instruction": ins, "input": inp, "output": out}
        if row.get("label") not in (None, ""):
            rec["label"] = _parse_label(row["label"], where)
        return rec
    if "text" in row or "label" in row:
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{where}: 'text' must be a non-empty string, got {text!r}")
        if "label" not in row:
            raise DataError(f"{where}: classification row has no 'label' (expected an integer class id)")
        return {"text": text, "label": _parse_label(row["label"], where)}
    raise DataError(f"{where}: unknown row with keys {sorted(row)}; expected {{'text','label'}} "
                    "(classification) or {'instruction','input','output'} (causal LM)")


def _parse_label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where}: 'label' must be an integer >= 0, got {value!r}")
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise DataError(f"{where}: 'label' must be an integer >= 0, got {value!r}") from None
    if not f.is_integer() or f < 0:
        raise DataError(f"{where}: 'label' must be an integer >= 0, got {value!r}")
    return int(f)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    out = []
    with _open_text(path) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
            out.append(_normalise(row, f"{path}:{i}"))
    return out


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, Any]]:
    out = []
    with _open_text(path) as fh:
        quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}:1: empty file; expected a header row such as 'text,label' or 'label<TAB>sentence'")
        header = [h.strip().lower() for h in header]
        for i, cells in enumerate(reader, 2):
            if not cells or all(not c.strip() for c in cells):
                continue
            if len(cells) != len(header):
                raise DataError(f"{path}:{i}: {len(cells)} columns but the header {header} has {len(header)}")
            out.append(_normalise(dict(zip(header, cells)), f"{path}:{i}"))
    return out


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSONL / CSV / TSV file (optionally .gz) into validated records of one kind."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file {p} does not exist")
    suffix = _base_suffix(p)
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".ndjson": _read_jsonl,
               ".csv": lambda q: _read_delimited(q, ","), ".tsv": lambda q: _read_delimited(q, "\t")}
    if suffix not in readers:
        raise DataError(f"{p}: unsupported data format {suffix!r}; use .jsonl, .csv or .tsv (optionally .gz)")
    try:
        recs = readers[suffix](p)
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not a UTF-8 text file (found byte 0x{e.object[e.start]:02x}, which is not UTF-8); pass a JSONL / CSV / TSV text file saved as UTF-8, "
                        "optionally gzip-compressed as .gz") from None
    except (gzip.BadGzipFile, EOFError, OSError, csv.Error) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise DataError(f"{p}: cannot be read as {'gzip-compressed ' if p.suffix == '.gz' else ''}text ({e}); "
                        "pass a JSONL / CSV / TSV text file saved as UTF-8, optionally gzip-compressed as .gz") from None
    if not recs:
        raise DataError(f"{p}: no records found")
    kinds = {record_kind(r) for r in recs}
    if len(kinds) > 1:
        raise DataError(f"{p}: mixes classification and instruction rows; use one kind per file")
    return recs


def data_dir() -> Path:
    """Folder with the vendored data: $EDGE_DATA_DIR, else `<repo>/data` next to the package."""
    env = os.environ.get("EDGE_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "data"


def load_sst2(split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """GLUE SST-2 as classification records (0 negative, 1 positive); `limit` keeps the first rows."""
    if split not in ("train", "dev"):
        raise ValueError(f"SST-2 split must be 'train' or 'dev', got {split!r}")
    d = data_dir()
    for name in (f"sst2-{split}.tsv.gz", f"sst2-{split}.tsv"):
        if (d / name).is_file():
            recs = load_records(d / name)
            return recs[:limit] if limit else recs
    raise FileNotFoundError(f"SST-2 {split} split not found in {d}; set EDGE_DATA_DIR to the folder "
                            f"holding sst2-{split}.tsv.gz")


def classification_to_instructions(records: Sequence[dict[str, Any]], template: str = DEFAULT_TEMPLATE,
                                   label_words: Sequence[str] = DEFAULT_LABEL_WORDS) -> list[dict[str, Any]]:
    """Cast {"text","label"} records as instructions: review in the prompt, label word as response.

    `template` has a `{text}` field. The label is kept so accuracy can still be measured.
    """
    if "{text}" not in template:
        raise ValueError("template must contain a '{text}' field for the review")
    out = []
    for i, r in enumerate(records):
        if "text" not in r or "label" not in r:
            raise DataError(f"record {i} is not a classification record (needs 'text' and 'label')")
        if not 0 <= r["label"] < len(label_words):
            raise DataError(f"record {i} has label {r['label']} but only {len(label_words)} label words {list(label_words)}")
        out.append({"instruction": template.format(text=r["text"]), "input": "",
                    "output": label_words[r["label"]], "label": int(r["label"])})
    return out


def partition(records: Sequence[dict[str, Any]], n: int, scheme: str = "iid", alpha: float = 0.5,
              seed: int = 0) -> list[list[dict[str, Any]]]:
    """Split records across `n` clients; seeded, reproducible, every shard non-empty.

    iid: uniform shuffle. dirichlet: per-label proportions ~ Dir(alpha) (label skew; needs
    'label'). quantity: shard sizes ~ Dir(alpha) (quantity skew), labels iid.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"partition scheme {scheme!r} unknown; use one of {SCHEMES}")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of shards must be an integer >= 1, got {n!r}")
    if n > len(records):
        raise ValueError(f"cannot split {len(records)} records into {n} non-empty shards")
    if scheme != "iid" and not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    import numpy as np

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        idx = [list(s) for s in np.array_split(rng.permutation(len(records)), n)]
    elif scheme == "quantity":
        props = rng.dirichlet([alpha] * n)
        sizes = _sizes_with_floor(props, len(records), 1)
        perm = rng.permutation(len(records))
        bounds = np.cumsum([0] + sizes)
        idx = [list(perm[bounds[i]:bounds[i + 1]]) for i in range(n)]
    else:
        idx = _dirichlet_label_split(records, n, alpha, rng)
    return [[records[int(i)] for i in shard] for shard in idx]


def _sizes_with_floor(props: np.ndarray, total: int, floor: int) -> list[int]:
    """Integer sizes summing to `total`, proportional to `props`, each >= floor."""
    import numpy as np

    n = len(props)
    extra = total - floor * n
    raw = props * extra
    sizes = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - sizes))[: extra - int(sizes.sum())]:
        sizes[i] += 1
    return [int(s) + floor for s in sizes]


def _dirichlet_label_split(records: Sequence[dict[str, Any]], n: int, alpha: float,
                           rng: np.random.Generator) -> list[list[int]]:
    import numpy as np

    missing = [i for i, r in enumerate(records) if "label" not in r]
    if missing:
        raise ValueError(f"dirichlet partition needs a 'label' on every record (record {missing[0]} has none); "
                         "use scheme='iid' or 'quantity'")
    labels = np.array([int(r["label"]) for r in records])
    shards: list[list[int]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet([alpha] * n)
        cuts = (np.cumsum(props)[:-1] * len(members)).astype(int)
        for k, part in enumerate(np.split(members, cuts)):
            shards[k].extend(int(i) for i in part)
    # every shard non-empty: move one example from the largest shard to each empty one
    for k in range(n):
        if not shards[k]:
            donor = max(range(n), key=lambda j: len(shards[j]))
            shards[k].append(shards[donor].pop(int(rng.integers(len(shards[donor])))))
    return shards
