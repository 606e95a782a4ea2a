"""The examples run end to end with --quick (real Trainer, tiny Llama) and write their plot and JSON;
--quick never touches the committed full-run results in examples/results/."""

import hashlib
import importlib.util
import json
import math
import shutil
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


def _digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(autouse=True)
def _committed_results_untouched():
    """Every example test leaves examples/results/ byte for byte as committed."""
    before = _digests(EXAMPLES / "results")
    yield
    assert _digests(EXAMPLES / "results") == before


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


def test_quick_refuses_the_committed_results_folder():
    utils = _load("example_utils")
    with pytest.raises(ValueError, match="--out: a --quick run must not write into"):
        utils.output_dir(EXAMPLES / "results", True, "x")
    with pytest.raises(ValueError, match="--out: a --quick run must not write into"):
        _load("learning_forgetting").main(["--quick", "--out", str(EXAMPLES / "results" / "sub")])


def test_learning_forgetting_quick():
    """No --out: the run picks a temporary folder itself (and the fixture checks examples/results/)."""
    results = _load("learning_forgetting").main(["--quick"])
    out = Path(results["config"]["out"])
    try:
        assert out.resolve() != (EXAMPLES / "results").resolve() and out.is_dir()
        for suffix in ("tradeoff", "curves", "final", "spectra"):
            assert (out / f"learning_forgetting_{suffix}.png").stat().st_size > 10_000
        saved = json.loads((out / "learning_forgetting.json").read_text())
        assert set(saved) == {"config", "pretrain", "runs", "random_gaussian_rank90", "summary", "seconds"}
        assert set(saved["summary"]["methods"]) == set(saved["runs"])
        assert set(saved["pretrain"]["base"]) == {"A_accuracy", "A_answer_loss", "B_accuracy", "B_answer_loss"}
        runs = saved["runs"]
        assert list(runs) == ["full fine-tuning", "full, weight decay 1", "full, attention dropout 0.1", "LoRA r=2",
                              "LoRA r=8", "LoRA r=32", "MoRA type 1 (r=8 budget)", "MoRA type 6 (r=8 budget)"]
        steps = results["config"]["steps"]
        for name, run in runs.items():
            assert {"trainable_parameters", "train_loss", "eval", "seconds", "delta_w", "lr"} <= set(run)
            assert run["eval"][0]["step"] == 0 and run["eval"][-1]["step"] == steps
            for row in run["eval"]:
                assert set(row) == {"step", "A_accuracy", "A_answer_loss", "B_accuracy", "B_answer_loss",
                                    "forgetting_accuracy", "forgetting_loss"}
                assert 0.0 <= row["A_accuracy"] <= 1.0 and 0.0 <= row["B_accuracy"] <= 1.0
                assert math.isfinite(row["A_answer_loss"]) and math.isfinite(row["B_answer_loss"])
            first = run["eval"][0]  # step 0 is the base model for every method
            assert first["forgetting_accuracy"] == pytest.approx(0.0, abs=1e-9)
            assert first["forgetting_loss"] == pytest.approx(0.0, abs=1e-5)
            assert len(run["delta_w"]) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
            for spec in run["delta_w"].values():
                assert 1 <= spec["rank90"] <= min(spec["shape"])
                if run["adapter"] == "lora":
                    assert spec["rank90"] <= run["rank"]  # a LoRA update has rank <= r
        full = runs["full fine-tuning"]["trainable_parameters"]
        assert runs["LoRA r=2"]["trainable_parameters"] < runs["LoRA r=8"]["trainable_parameters"] < full
    finally:
        shutil.rmtree(out)


def test_at_learning_interpolates_the_first_crossing():
    at_learning = _load("learning_forgetting").at_learning
    rows = [{"step": 0, "B_accuracy": 0.1, "A_accuracy": 1.0, "forgetting_loss": 0.0},
            {"step": 10, "B_accuracy": 0.5, "A_accuracy": 0.8, "forgetting_loss": 1.0},
            {"step": 20, "B_accuracy": 0.4, "A_accuracy": 0.6, "forgetting_loss": 2.0},
            {"step": 30, "B_accuracy": 0.9, "A_accuracy": 0.4, "forgetting_loss": 3.0}]
    assert at_learning(rows, 0.3) == pytest.approx({"step": 5.0, "A_accuracy": 0.9, "forgetting_loss": 0.5})
    assert at_learning(rows, 0.5) == pytest.approx({"step": 10.0, "A_accuracy": 0.8, "forgetting_loss": 1.0})
    assert at_learning(rows, 0.7) == pytest.approx({"step": 26.0, "A_accuracy": 0.48, "forgetting_loss": 2.6})
    assert at_learning(rows, 0.05) == {"step": 0, "A_accuracy": 1.0, "forgetting_loss": 0.0}
    assert at_learning(rows, 0.95) is None


def test_variance_rank_on_a_known_spectrum():
    variance_rank = _load("learning_forgetting").variance_rank
    generator = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(12, 12, generator=generator, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(9, 9, generator=generator, dtype=torch.float64))
    energy = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01, 0, 0, 0, 0], dtype=torch.float64)  # s_i^2 / sum
    matrix = u[:, :9] @ torch.diag(energy.sqrt() * 7.0) @ v.T  # [12, 9], singular values 7 sqrt(energy)
    assert torch.linalg.svdvals(matrix)[:5].square().div(49).tolist() == pytest.approx(energy[:5].tolist())
    for fraction, rank in [(0.4, 1), (0.6, 2), (0.9, 3), (0.97, 4), (0.995, 5), (1.0, 5)]:
        assert variance_rank(matrix.float(), fraction) == rank, fraction
        assert variance_rank(matrix.T, fraction) == rank, fraction
    assert variance_rank(torch.eye(10)) == 9  # flat spectrum: 9 of 10 equal values hold exactly 90%
    assert variance_rank(torch.zeros(4, 3)) == 0
    with pytest.raises(ValueError, match="delta must be a 2-D tensor"):
        variance_rank(torch.ones(3))
    with pytest.raises(ValueError, match="fraction must be in"):
        variance_rank(torch.ones(3, 3), 0.0)
