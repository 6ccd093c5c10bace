"""The one non-finite rule (enkg_dist.evaluation): the same verdict wherever a forward output is judged."""

import numpy as np
import torch

from enkg_dist.evaluation import NON_FINITE, Evaluator, ForwardResult, judge, judged, take_in
from enkg_dist.problems.base import ForwardModel, safe_evaluate


def test_judge_fails_non_finite_rows_and_keeps_a_simulators_reason():
    psi = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [float("inf"), 1.0], [3.0, 4.0]])
    res = judge(ForwardResult(psi, torch.tensor([True, True, False, False]), [None, None, "timeout", None]))
    assert res.ok.tolist() == [True, False, False, False]
    assert res.reasons == [None, NON_FINITE, "timeout", None]  # a finite failed row keeps having no reason
    assert judge(res).reasons == res.reasons and torch.equal(judge(res).ok, res.ok)  # judging twice: no change
    ok, reasons = judged(psi.numpy(), np.array([True, True, False, False]), [None, None, "timeout", None])
    assert ok.tolist() == res.ok.tolist() and reasons == res.reasons  # numpy (the store's records) alike
    assert ForwardResult.from_outputs(psi).reasons == [None, NON_FINITE, NON_FINITE, None]


class OkButNaN(ForwardModel):
    """A model that reports every member ok, with NaN outputs for member 1."""

    state_shape, obs_size = (2,), 2

    def __call__(self, x, members=None):
        psi = x.clone()
        psi[1] = float("nan")
        return ForwardResult(psi, torch.ones(x.shape[0], dtype=torch.bool), [None] * x.shape[0])


def test_a_result_is_judged_where_it_is_made_and_counted_as_the_update_sees_it():
    x = torch.arange(8.0).reshape(4, 2)
    res = safe_evaluate(OkButNaN(), x)
    assert res.ok.tolist() == [True, False, True, True] and res.reasons[1] == NON_FINITE
    ev = Evaluator(lambda x_hat: ForwardResult(*OkButNaN()(x_hat).__dict__.values()))  # unjudged on purpose
    psi, ok = ev(x)
    assert ev.n_failed == 1 and ev.failures == [(1, NON_FINITE)] and ok.tolist() == res.ok.tolist()
    psi_in, ok_in = take_in(psi, ok, 4, torch.zeros(2, dtype=torch.float32))
    assert ok_in.tolist() == ok.tolist() and psi_in.dtype == torch.float32 and bool((psi_in[1] == 0).all())
