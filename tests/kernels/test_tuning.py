"""The per-GPU tuned-config file (pgolf.kernels.tuning): one JSON per GPU, one section per op, merged writes."""

from __future__ import annotations

import json

import pytest
import torch

import pgolf.utils
from pgolf.kernels import tuning


@pytest.fixture
def tuned_dir(tmp_path, monkeypatch):
    """PGOLF_TUNED_DIR → a fresh folder, and an empty read cache."""
    folder = tmp_path / "tuned"
    monkeypatch.setenv(tuning.ENV_DIR, str(folder))
    monkeypatch.setattr(tuning, "_FILES", {})
    return folder


def test_save_for_two_ops_keeps_both_sections(tuned_dir):
    p1 = tuning.save("op_a", {"k1": {"BM": 64}}, "gpu_x")
    p2 = tuning.save("op_b", {"k1": {"BN": 32}}, "gpu_x")
    p3 = tuning.save("op_a", {"k2": {"BM": 128}}, "gpu_x")  # merges into op_a, leaves op_b alone
    assert p1 == p2 == p3 == tuned_dir / "gpu_x.json"
    data = json.loads(p1.read_text())
    assert data["ops"] == {"op_a": {"k1": {"BM": 64}, "k2": {"BM": 128}}, "op_b": {"k1": {"BN": 32}}}
    assert data["triton"]
    assert tuning.load("op_a", "gpu_x") == {"k1": {"BM": 64}, "k2": {"BM": 128}}
    assert tuning.load("op_b", "gpu_x") == {"k1": {"BN": 32}}
    tuning.save("op_a", {"k1": {"BM": 16}}, "gpu_x")  # a new pick for an existing key replaces it
    assert tuning.load("op_a", "gpu_x")["k1"] == {"BM": 16}


def test_save_rereads_the_file_it_did_not_write(tuned_dir):
    """A section written by someone else (another process) after this one read the file survives our save."""
    tuning.save("op_a", {"k": {"BM": 64}}, "gpu_x")
    assert tuning.load("op_a", "gpu_x")  # the file is now cached in this process
    path = tuned_dir / "gpu_x.json"
    data = json.loads(path.read_text())
    data["ops"]["op_b"] = {"k": {"BN": 32}}
    path.write_text(json.dumps(data))
    tuning.save("op_a", {"k2": {"BM": 128}}, "gpu_x")
    assert json.loads(path.read_text())["ops"]["op_b"] == {"k": {"BN": 32}}
    assert tuning.load("op_b", "gpu_x") == {"k": {"BN": 32}}


def test_load_missing_gives_empty(tuned_dir):
    assert tuning.load("op_a", "no_such_gpu") == {}  # no file
    tuning.save("op_a", {"k": {"BM": 64}}, "gpu_x")
    assert tuning.load("op_b", "gpu_x") == {}  # file without that op
    (tuned_dir / "broken.json").write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert tuning.load("op_a", "broken") == {}
    assert not (tuned_dir / "gpu_y.json").exists()
    assert tuning.load("op_a", "gpu_y") == {}


def test_env_overrides_the_directory(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "_FILES", {})
    monkeypatch.delenv(tuning.ENV_DIR, raising=False)
    assert tuning.path("gpu_x") == tuning.DEFAULT_DIR / "gpu_x.json"
    assert tuning.DEFAULT_DIR.name == "tuned" and tuning.DEFAULT_DIR.parent.name == "kernels"
    elsewhere = tmp_path / "a" / "b"
    monkeypatch.setenv(tuning.ENV_DIR, str(elsewhere))
    assert tuning.path("gpu_x") == elsewhere / "gpu_x.json"
    assert tuning.save("op_a", {"k": {"BM": 1}}, "gpu_x") == elsewhere / "gpu_x.json"  # creates the folder
    assert tuning.load("op_a", "gpu_x") == {"k": {"BM": 1}}
    monkeypatch.setenv(tuning.ENV_DIR, str(tmp_path / "other"))
    assert tuning.load("op_a", "gpu_x") == {}  # read from the new folder, not the cache of the old one


def test_writes_are_atomic(tuned_dir, monkeypatch):
    for i in range(3):
        tuning.save(f"op_{i}", {"k": {"BM": i}}, "gpu_x")
    assert [p.name for p in tuned_dir.iterdir()] == ["gpu_x.json"]  # no temp files left
    before = (tuned_dir / "gpu_x.json").read_text()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    with monkeypatch.context() as m, pytest.raises(OSError, match="disk full"):
        m.setattr(pgolf.utils.os, "replace", fail)  # the write dies after the temp file is written
        tuning.save("op_0", {"k": {"BM": 99}}, "gpu_x")
    assert (tuned_dir / "gpu_x.json").read_text() == before  # the old file is intact
    assert [p.name for p in tuned_dir.iterdir()] == ["gpu_x.json"]


def test_gpu_slug(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    tuning._slug.cache_clear()
    try:
        assert tuning.gpu_slug(0) == "nvidia_h100_80gb_hbm3"
        assert tuning.gpu_slug(torch.device("cuda", 0)) == "nvidia_h100_80gb_hbm3"
    finally:
        tuning._slug.cache_clear()


def test_pow2_bucket():
    assert [tuning.pow2_bucket(n) for n in (0, 1, 2, 3, 16, 17, 2048, 2049)] == [1, 1, 2, 4, 16, 32, 2048, 4096]
    assert [tuning.pow2_bucket(n, lo=16, hi=1 << 17) for n in (1, 16, 17, 2048, 2049, 98304, 10 ** 9)] == \
        [16, 16, 32, 2048, 4096, 131072, 131072]
