"""Device profiles: every shipped YAML loads; every bad field is rejected with its name."""
from pathlib import Path

import pytest
import yaml

from edge_runtime.profile import DeviceProfile, ProfileError, load_profile, parse_bytes, profile_from_dict, save_profile

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))
REAL = ["jetson-nano-4gb", "jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-32gb", "jetson-agx-orin-64gb",
        "raspberry-pi-5-8gb", "phone-soc-8gb", "phone-soc-12gb", "laptop-cpu-16gb", "desktop-gpu-24gb"]

GOOD = {"name": "dev", "memory_total": "8GiB", "memory_budget": "6GiB", "compute_gflops": {"fp32": 100.0},
        "precisions": ["fp32", "nf4"]}


def test_all_shipped_profiles_load():
    names = {load_profile(p).name for p in PROFILES}
    assert set(REAL) <= names
    assert sum(1 for p in PROFILES if load_profile(p).kind == "emulated") >= 4
    for p in PROFILES:
        prof = load_profile(p)
        assert prof.name == p.stem, f"{p.name}: name must match the file name"
        assert prof.source, f"{p.name}: needs a source note"


def test_desktop_gpu_is_discrete_cuda():
    prof = load_profile(ROOT / "profiles/desktop-gpu-24gb.yaml")
    assert prof.accelerator == "cuda" and prof.unified_memory is False
    assert prof.memory_total_bytes == 24 * 2**30


def test_parse_bytes_units():
    assert parse_bytes("8GiB") == 8 * 2**30
    assert parse_bytes("512 MB") == 512 * 10**6
    assert parse_bytes(1234) == 1234
    with pytest.raises(ProfileError, match="memory_total"):
        parse_bytes("8 parsecs", "memory_total")


BAD_FIELDS = [
    ("name", "bad name!"), ("kind", "virtual"), ("accelerator", "tpu"), ("memory_total", "lots"),
    ("memory_budget", "9GiB"), ("memory_budget", -1), ("compute_gflops", {"fp16": 10}), ("compute_gflops", {"fp32": -5}),
    ("precisions", ["fp8"]), ("precisions", []), ("uplink_mbps", 0), ("downlink_mbps", -3), ("latency_ms", -1),
    ("availability", 1.5), ("dropout", -0.1), ("round_deadline_s", 0), ("unified_memory", "yes"),
    ("budget_excludes_runtime", "no"), ("accelerator_name", 5), ("source", 3), ("notes", ["x"]),
]


@pytest.mark.parametrize("field,value", BAD_FIELDS)
def test_each_bad_field_is_named(field, value):
    d = dict(GOOD, **{field: value})
    with pytest.raises(ProfileError, match=field):
        profile_from_dict(d, "test.yaml")


def test_unknown_and_missing_fields():
    with pytest.raises(ProfileError, match="colour"):
        profile_from_dict(dict(GOOD, colour="red"))
    d = dict(GOOD)
    d.pop("compute_gflops")
    with pytest.raises(ProfileError, match="compute_gflops"):
        profile_from_dict(d)
    d = dict(GOOD)
    d.pop("memory_budget")
    with pytest.raises(ProfileError, match="memory_budget"):
        profile_from_dict(d)


def test_save_load_roundtrip(tmp_path):
    prof = profile_from_dict(GOOD)
    save_profile(prof, tmp_path / "p.yaml")
    again = load_profile(tmp_path / "p.yaml")
    assert again == prof
    assert yaml.safe_load((tmp_path / "p.yaml").read_text())["memory_total"] == 8 * 2**30


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "nope.yaml")
    (tmp_path / "b.yaml").write_text("name: [unclosed")
    with pytest.raises(ProfileError, match="YAML"):
        load_profile(tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("- a list")
    with pytest.raises(ProfileError, match="mapping"):
        load_profile(tmp_path / "c.yaml")


def test_dataclass_validates_directly():
    with pytest.raises(ProfileError, match="memory_total_bytes"):
        DeviceProfile(name="x", memory_total_bytes=0, memory_budget_bytes=1, compute_gflops={"fp32": 1.0})
