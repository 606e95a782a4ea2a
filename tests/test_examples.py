"""The examples run end to end with --quick (real Trainer, tiny Llama) and write their plot and JSON."""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_uuid_memorization_quick(tmp_path):
    results = _load("uuid_memorization").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "uuid_memorization.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "uuid_memorization.json").read_text())["runs"].keys() == results["runs"].keys()
    runs = results["runs"]
    assert len(runs) == 4
    counts = {name: run["trainable_parameters"] for name, run in runs.items()}
    lora = next(v for k, v in counts.items() if k.startswith("LoRA"))
    for name, count in counts.items():
        if name.startswith("MoRA"):
            assert abs(count - lora) <= 0.05 * lora, counts  # same budget up to r_hat rounding
    full = next(v for k, v in counts.items() if k.startswith("full"))
    assert full > 3 * lora
    for run in runs.values():
        assert all(0.0 <= row["accuracy"] <= 1.0 for row in run["eval"])
        assert run["eval"][0]["step"] == 0 and run["eval"][-1]["step"] == results["config"]["steps"]
        assert all(math.isfinite(loss) for _, loss in run["train_loss"])
        assert run["train_loss"][-1][1] < run["train_loss"][0][1]


def test_instruction_weighting_quick(tmp_path):
    results = _load("instruction_weighting").main(["--quick", "--out", str(tmp_path)])
    assert (tmp_path / "instruction_weighting.png").stat().st_size > 10_000
    assert (tmp_path / "instruction_weighting.json").exists()
    runs = results["runs"]
    assert list(runs) == ["instruction_weight=0", "instruction_weight=0.1", "instruction_weight=1"]
    for run in runs.values():
        assert all(0.0 <= row["accuracy"] <= 1.0 and math.isfinite(row["answer_loss"]) for row in run["eval"])
    learned = runs["instruction_weight=1"]["eval"]
    assert learned[-1]["answer_loss"] < learned[0]["answer_loss"]
