"""edge_runtime.data: loaders (JSONL/CSV/TSV/.gz, GLUE SST-2), bad-row errors, partitioning."""
import gzip
import json

import pytest

from edge_runtime.data import (DataError, classification_to_instructions, load_records, load_sst2, partition)


def _write(path, text, gz=False):
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_classification_and_instruction(tmp_path):
    p = _write(tmp_path / "c.jsonl", '{"text": "good film", "label": 1}\n\n{"text": "bad", "label": "0"}\n')
    assert load_records(p) == [{"text": "good film", "label": 1}, {"text": "bad", "label": 0}]
    q = _write(tmp_path / "i.jsonl.gz", json.dumps({"instruction": "Say hi", "output": "hi"}) + "\n", gz=True)
    assert load_records(q) == [{"instruction": "Say hi", "input": "", "output": "hi"}]


def test_csv_tsv_and_glue_format(tmp_path):
    p = _write(tmp_path / "a.csv", 'text,label\n"a, quoted text",1\nplain,0\n')
    assert load_records(p)[0] == {"text": "a, quoted text", "label": 1}
    t = _write(tmp_path / "b.tsv.gz", "label\tsentence\n0\thide new secretions\n1\ta \"quoted\" gem\n", gz=True)
    assert load_records(t) == [{"text": "hide new secretions", "label": 0}, {"text": 'a "quoted" gem', "label": 1}]


@pytest.mark.parametrize("content,needle", [
    ('{"text": "ok", "label": 1}\n{"text": "x", "label": -1}\n', ":2: 'label'"),
    ('{"text": "ok", "label": 1}\nnot json\n', ":2: not valid JSON"),
    ('{"text": "", "label": 1}\n', ":1: 'text'"),
    ('{"foo": 1}\n', ":1: unknown row"),
    ('{"instruction": "a", "output": ""}\n', ":1: 'output'"),
    ('{"text": "a", "label": 1}\n{"instruction": "a", "output": "b"}\n', "mixes"),
])
def test_bad_rows_name_file_and_line(tmp_path, content, needle):
    p = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(DataError) as e:
        load_records(p)
    assert needle in str(e.value) and "bad.jsonl" in str(e.value)


def test_bad_tsv_column_count_and_format(tmp_path):
    p = _write(tmp_path / "x.tsv", "label\tsentence\n1\tfine\n1\ttoo\tmany\n")
    with pytest.raises(DataError, match=r"x.tsv:3: 3 columns"):
        load_records(p)
    with pytest.raises(DataError, match="unsupported data format"):
        load_records(_write(tmp_path / "x.parquet", "x"))
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")


def test_sst2_vendored_and_env_override(tmp_path, monkeypatch):
    dev = load_sst2("dev")
    assert len(dev) == 872 and set(r["label"] for r in dev) == {0, 1}
    assert len(load_sst2("train", limit=10)) == 10
    monkeypatch.setenv("EDGE_DATA_DIR", str(tmp_path))
    _write(tmp_path / "sst2-dev.tsv", "label\tsentence\n1\tonly row\n")
    assert load_sst2("dev") == [{"text": "only row", "label": 1}]
    with pytest.raises(FileNotFoundError, match="EDGE_DATA_DIR"):
        load_sst2("train")
    with pytest.raises(ValueError):
        load_sst2("test")


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partition_reproducible_nonempty_complete(scheme):
    recs = load_sst2("train", limit=500)
    a = partition(recs, 20, scheme, alpha=0.1, seed=3)
    b = partition(recs, 20, scheme, alpha=0.1, seed=3)
    c = partition(recs, 20, scheme, alpha=0.1, seed=4)
    assert a == b and a != c
    assert len(a) == 20 and all(len(s) > 0 for s in a)
    assert sorted(r["text"] for s in a for r in s) == sorted(r["text"] for r in recs)


def test_partition_skew_and_errors():
    recs = load_sst2("train", limit=2000)
    iid = partition(recs, 10, "iid", seed=0)
    dirich = partition(recs, 10, "dirichlet", alpha=0.1, seed=0)
    frac = lambda s: sum(r["label"] for r in s) / len(s)  # noqa: E731
    spread = lambda shards: max(map(frac, shards)) - min(map(frac, shards))  # noqa: E731
    assert spread(dirich) > spread(iid) + 0.3
    sizes = [len(s) for s in partition(recs, 10, "quantity", alpha=0.3, seed=0)]
    assert max(sizes) > 3 * min(sizes)
    with pytest.raises(ValueError, match="non-empty"):
        partition(recs[:3], 4)
    with pytest.raises(ValueError, match="scheme"):
        partition(recs, 2, "zipf")
    with pytest.raises(ValueError, match="label"):
        partition([{"instruction": "a", "input": "", "output": "b"}] * 4, 2, "dirichlet")


def test_classification_to_instructions():
    out = classification_to_instructions([{"text": "a fine film", "label": 1}, {"text": "dull", "label": 0}])
    assert out[0]["output"] == "positive" and out[1]["output"] == "negative"
    assert "a fine film" in out[0]["instruction"] and out[0]["label"] == 1
    with pytest.raises(ValueError):
        classification_to_instructions([{"text": "x", "label": 1}], template="no field")
