"""tools/benchmark_embed.py on a tiny configuration: a real folder and export, all three variants; no timing checks."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate.state import AcceleratorState
from tool_module import load_tool


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tool = load_tool("benchmark_embed")
    tmp = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        results = tool.main(["--models", "tiny-vit-64", "--images", "6", "--size", "160", "--repeats", "1",
                             "--batch-size", "4", "--part-size", "4", "--workers", "0", "--threads", "1",
                             "--cache", str(tmp / "cache"), "--json", str(tmp / "out.json")])
    finally:
        torch.set_num_threads(threads)
        AcceleratorState._reset_state(reset_partial_state=True)
    return tmp, results


def test_table_json_and_agreement(run):
    tmp, results = run
    assert json.loads((tmp / "out.json").read_text()) == json.loads(json.dumps(results))
    (model,) = results["models"]
    assert model["model"] == "tiny-vit-64" and set(model["ratio"]) == {"ours", "ours_full_decode"}
    for variant in ("reference", "ours", "ours_full_decode"):
        assert len(model["samples_per_s"][variant]["runs"]) == 1 and model["samples_per_s"][variant]["median"] > 0
    # decoded whole, our rows are the reference's to float16 precision; text always is
    assert model["agreement"]["ours_full_decode"]["image"]["min"] > 0.9999
    assert model["agreement"]["ours"]["text"]["min"] > 0.9999
    assert model["agreement"]["ours"]["image"]["mean"] > 0.99
    assert len(list((tmp / "cache").glob("folder-*/*.txt"))) == 6
