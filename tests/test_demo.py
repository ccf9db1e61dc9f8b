"""The ``make demo`` path end to end on a small slice of Fashion-MNIST."""

from __future__ import annotations

import pytest

from bayesprune import demo


@pytest.mark.fmnist
def test_demo_trains_prunes_finetunes_and_reports(fmnist_available, capsys) -> None:
    out = demo.main(
        ["--subset", "2000", "--epochs", "2", "--bayes-epochs", "2", "--finetune-epochs", "1",
         "--no-progress"]
    )  # fmt: skip
    text = capsys.readouterr().out
    for step in ("1/4", "2/4", "3/4", "fine-tuning", "4/4", "test accuracy: dense"):
        assert step in text
    rep = out["report"]
    assert rep.params_after <= rep.params_before
    assert 0.5 < out["dense_acc"] <= 1  # 10 classes: a trained net is far above chance
    assert 0.0 <= out["pruned_acc"] <= 1 and 0.0 <= out["finetuned_acc"] <= 1
