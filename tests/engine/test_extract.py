"""Feature extraction: a singular CSALR solve ends in an error that says how to retrain."""

from __future__ import annotations

import pytest
import torch

from reidkit.engine.extract import extract_features
from reidkit.errors import NumericalError, ReidkitError


class SingularOn(torch.nn.Module):
    """Stands in for a CSALR model whose landmark solve fails on the `fail_on`-th call."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.calls, self.fail_on = 0, fail_on

    def forward(self, images: torch.Tensor):
        self.calls += 1
        if self.calls == self.fail_on:
            raise torch.linalg.LinAlgError(
                "The solver failed because the input matrix is singular.\nmore detail"
            )
        return None  # never embedded: the batch's next call fails first


@pytest.mark.parametrize(("flip", "fail_on"), [(False, 1), (True, 2)])
def test_singular_landmark_solve_is_a_reidkit_error_naming_the_retraining(flip, fail_on):
    loader = [(torch.zeros(2, 3, 8, 4),)]
    with pytest.raises(NumericalError) as err:
        extract_features(SingularOn(fail_on), loader, flip=flip, progress=False)
    message = str(err.value)
    assert isinstance(err.value, ReidkitError) and "\n" not in message
    assert "input matrix is singular" in message
    assert "train it again with --set attention.landmark_weight=2" in message
