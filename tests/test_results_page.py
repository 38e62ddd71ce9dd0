"""scripts/results_page.py: the per-claim verdicts of docs/results.md follow from the numbers, and the
two CSVs of `slm report` join on their config columns. Rows are written by hand with known deltas."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "results_page.py"


@pytest.fixture(scope="module")
def page():
    spec = importlib.util.spec_from_file_location("results_page", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def row(steps: tuple[float, float] | None, nominal: tuple[float, float] | None, saved: float = 0.27) -> dict[str, str]:
    out = {"selection.name": "eslm", "selection.alpha": "0.4", "flops_saved_frac_nominal_mean": str(saved)}
    for name, d in (("same_steps", steps), ("same_nominal", nominal), ("same_realized", nominal)):
        if d is not None:
            out[f"delta_{name}"], out[f"delta_{name}_se"] = str(d[0]), str(d[1])
    return out


def test_claim_verdicts_follow_the_deltas(page) -> None:
    assert page.claim(row((-0.10, 0.02), (-0.2, 0.02))).startswith("**reproduces**: a lower loss after the same steps with 27%")
    assert page.claim(row((0.01, 0.02), (-0.1, 0.02))).startswith("**reproduces**: CLM's (within the noise) loss")
    assert page.claim(row((0.10, 0.02), (0.01, 0.02))).startswith("**in part**")
    assert page.claim(row((0.10, 0.02), (0.10, 0.02))).startswith("**does not reproduce**")
    assert page.claim(row((0.10, 0.02), None)).startswith("**not shown**")
    assert page.claim(row((0.10, 0.0), (0.1, 0.0))).startswith("**not judged**")  # one run each: no spread
    assert page.claim(row((-0.10, 0.02), None, saved=-0.17)).startswith("**no saving**: 17% more nominal FLOPs")


def test_keep_method_and_join(page) -> None:
    eslm = {"selection.name": "eslm", "selection.alpha": "0.4", "selection.score": "entropy", "target.name": "onehot"}
    assert page.keep(eslm) == pytest.approx(0.6) and page.method(eslm) == "eslm-entropy"
    assert page.method({"selection.name": "eslm", "target.name": "kd"}) == "eslm-kd"
    assert page.method({"selection.name": "clm", "target.name": "coconts"}) == "coconts"
    assert page.keep_text({"selection.name": "ada_eslm"}) == "adaptive"
    report = [{"selection.name": "clm", "n": "3"}, {"selection.name": "eslm", "n": "3"}]
    against = [{"selection.name": "eslm", "n": "3", "delta_same_steps": "-0.1"}]
    joined = page.joined(report, against)
    assert "delta_same_steps" not in joined[0] and joined[1]["delta_same_steps"] == "-0.1"
    assert page.diff_between({"val_loss_mean": "5.0", "val_loss_std": "0.3", "n": "3"},
                             {"val_loss_mean": "5.2", "val_loss_std": "0.4", "n": "3"}) == pytest.approx(
        (-0.2, ((0.09 + 0.16) / 3) ** 0.5))
