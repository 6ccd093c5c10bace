import pytest
import torch

from enkg_dist.problems.linear_gaussian import SubsampleBlur, make_problem


@pytest.mark.parametrize("blur", [0.0, 0.3])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_closed_form_posterior_matches_the_dense_formula(blur, k):
    problem, prior, post = make_problem(n=8, k=k, blur=blur, noise_std=0.2, truth_seed=3)
    H, C_post = post.dense()
    C = prior.dense_covariance()
    S = H @ C @ H.T + 0.04 * torch.eye(H.shape[0], dtype=torch.float64)
    m_dense = C @ H.T @ torch.linalg.solve(S, problem.y)
    assert torch.allclose(post.mean(problem.y).reshape(-1), m_dense, atol=1e-12)
    assert torch.allclose(post.variance().reshape(-1), torch.diagonal(C_post), atol=1e-12)
    assert torch.allclose(H @ problem.x_true.reshape(-1), problem.forward.apply(problem.x_true[None])[0], atol=1e-12)


def test_adjoint_is_the_transpose():
    G = SubsampleBlur(8, 2, blur=0.4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 8, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 16, generator=g, dtype=torch.float64)
    assert torch.allclose((G.apply(x) * v).sum(1), (x * G.adjoint(v)).sum((1, 2, 3)), atol=1e-12)


def test_forward_checks_shapes_and_marks_nan():
    problem, _, _ = make_problem(n=8, k=2)
    with pytest.raises(ValueError, match="state shape mismatch"):
        problem.forward(torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    x = torch.zeros(3, 1, 8, 8, dtype=torch.float64)
    x[1, 0, 0, 0] = float("nan")
    r = problem.forward(x)
    assert r.ok.tolist() == [True, False, True] and "non-finite" in r.reasons[1]
    with pytest.raises(ValueError, match="not a multiple"):
        SubsampleBlur(10, 4)
