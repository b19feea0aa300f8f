"""Data and models named by hub ids go through the real huggingface_hub / datasets code, served
from an offline mirror this test writes (a Hugging Face cache with one snapshot per repository,
``HF_HUB_OFFLINE=1``): what a cluster job sees after a pre-fetch on the login node."""

from __future__ import annotations

import json

import pytest

REVISION = "0123456789abcdef0123456789abcdef01234567"
RLVR_ROWS = [{"messages": [{"role": "user", "content": f"What is {i} + {i}?"}],
              "ground_truth": str(2 * i), "dataset": "gsm8k"} for i in range(5)]


def _snapshot(hub, kind: str, repo: str, files: dict[str, bytes]):
    base = hub / f"{kind}s--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(REVISION)
    for rel, data in files.items():
        path = base / "snapshots" / REVISION / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return base / "snapshots" / REVISION


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return hub


def test_rlvr_prompts_named_by_a_hub_id_are_read_as_rows_not_as_a_local_path(offline_hub):
    from tulu.rlvr.prompts import read_rows

    body = "".join(json.dumps(r) + "\n" for r in RLVR_ROWS).encode()
    _snapshot(offline_hub, "dataset", "allenai/RLVR-MATH", {"data/train.jsonl": body})
    rows = read_rows("allenai/RLVR-MATH", split="train")
    assert [r["ground_truth"] for r in rows] == [r["ground_truth"] for r in RLVR_ROWS]
    assert rows[0]["messages"] == RLVR_ROWS[0]["messages"]


def test_a_hub_model_id_resolves_to_its_cached_snapshot(offline_hub):
    from tulu.models.hub import local_model_folder

    folder = _snapshot(offline_hub, "model", "allenai/Llama-3.1-Tulu-3-8B-DPO",
                       {"config.json": b"{}", "model.safetensors": b"x"})
    assert local_model_folder("allenai/Llama-3.1-Tulu-3-8B-DPO") == folder


def test_a_missing_local_path_is_not_mistaken_for_a_hub_id(tmp_path):
    from tulu.models.hub import local_model_folder

    with pytest.raises(FileNotFoundError, match="neither a local folder nor a hub id"):
        local_model_folder(tmp_path / "no" / "such" / "model")


def test_an_sft_mixture_named_by_a_hub_id_loads_from_the_offline_snapshot(offline_hub):
    from tulu.data.source import load_source

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"hello {i}"}],
             "source": "test"} for i in range(3)]
    _snapshot(offline_hub, "dataset", "allenai/tulu-3-sft-mixture",
              {"data/train-00000-of-00001.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode()})
    ds = load_source("allenai/tulu-3-sft-mixture", split="train")
    assert [r["messages"][1]["content"] for r in ds] == ["hello 0", "hello 1", "hello 2"]
