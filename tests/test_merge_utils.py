"""grafting.merge_utils on its own: the combiners against PEFT's functions, pruning statistics, the SVD factors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from grafting import merge_utils
from grafting.errors import ConfigError


def _tasks(seed: int, count: int, shape: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(count)]


weights_st = st.lists(st.floats(-2, 2, allow_nan=False).filter(lambda w: abs(w) > 1e-3), min_size=1, max_size=4)
shapes_st = st.sampled_from([(7,), (5, 6), (3, 4, 2)])


@given(
    seed=st.integers(0, 2**16),
    weights=weights_st,
    shape=shapes_st,
    density=st.sampled_from([0.0, 0.1, 0.37, 0.5, 0.9, 1.0]),
    kind=st.sampled_from(["linear", "ties", "magnitude_prune"]),
    sign=st.sampled_from(["total", "frequency"]),
)
def test_deterministic_combiners_equal_peft_s(
    seed: int, weights: list[float], shape: tuple[int, ...], density: float, kind: str, sign: str
) -> None:
    import warnings

    from peft.utils import merge_utils as theirs

    tasks = _tasks(seed, len(weights), shape)
    ours = merge_utils.combine(kind, tasks, weights, density=density, majority_sign_method=sign)
    w = torch.tensor(weights, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns for density 1
        expected = {
            "linear": lambda: theirs.task_arithmetic(tasks, w),
            "ties": lambda: theirs.ties(tasks, w, density, sign),
            "magnitude_prune": lambda: theirs.magnitude_prune(tasks, w, density),
        }[kind]()
    torch.testing.assert_close(ours, expected)


@given(seed=st.integers(0, 2**16), shape=shapes_st, density=st.floats(0, 1))
def test_keep_largest_keeps_the_largest_magnitudes(seed: int, shape: tuple[int, ...], density: float) -> None:
    (t,) = _tasks(seed, 1, shape)
    kept = merge_utils.keep_largest(t, density)
    k = int(density * t.numel())
    nonzero = kept != 0
    assert int(nonzero.sum()) == k
    assert torch.equal(kept[nonzero], t[nonzero])  # kept entries untouched
    if 0 < k < t.numel():
        assert t[nonzero].abs().min() >= t[~nonzero].abs().max()


def test_keep_random_keeps_a_density_fraction_rescaled_and_is_unbiased() -> None:
    t = torch.linspace(-3, 3, 20_000, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    density = 0.3
    kept = merge_utils.keep_random(t, density, generator=gen)
    mask = kept != 0
    fraction = mask.double().mean().item()
    # binomial: sd = sqrt(p(1-p)/n) = 0.0032; 5 sd
    assert abs(fraction - density) < 0.017
    torch.testing.assert_close(kept[mask], t[mask] / density)
    # unbiased: the mean over many draws approaches the tensor (checked on a few entries' averages)
    draws = torch.stack([merge_utils.keep_random(t[:50], density, generator=gen) for _ in range(4000)])
    err = (draws.mean(0) - t[:50]).abs() / (t[:50].abs() * ((1 - density) / density / 4000) ** 0.5 + 1e-12)
    assert err.max() < 5  # within 5 standard errors everywhere
    # seeded: the same generator state gives the same mask
    a = merge_utils.keep_random(t, density, generator=torch.Generator().manual_seed(5))
    b = merge_utils.keep_random(t, density, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(merge_utils.keep_random(t, 1.0), t)
    assert not merge_utils.keep_random(t, 0.0).any()


def test_dare_combiners_follow_their_definitions() -> None:
    tasks = _tasks(3, 3, (40, 50))
    weights = [0.5, -1.0, 2.0]
    seed = 11
    ours = merge_utils.dare_linear(tasks, weights, 0.4, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed)
    pruned = [merge_utils.keep_random(t, 0.4, generator=gen) for t in tasks]
    torch.testing.assert_close(ours, merge_utils.task_arithmetic(pruned, weights))
    ties = merge_utils.dare_ties(tasks, weights, 0.4, "frequency", generator=torch.Generator().manual_seed(seed))
    stacked = torch.stack(pruned)
    mask = merge_utils.majority_sign_mask(stacked, "frequency")
    weighted = stacked * torch.tensor(weights, dtype=torch.float64)[:, None, None]
    torch.testing.assert_close(ties, merge_utils.disjoint_mean(weighted, mask))
    # with nothing dropped, DARE is task arithmetic
    full = merge_utils.dare_linear(tasks, weights, 1.0)
    torch.testing.assert_close(full, merge_utils.task_arithmetic(tasks, weights))


def test_majority_sign_and_disjoint_mean_by_hand() -> None:
    stacked = torch.tensor([[1.0, -1.0, 0.0, 2.0], [-3.0, -1.0, 0.0, -1.0], [1.0, 2.0, 0.0, -0.5]])
    total = merge_utils.majority_sign_mask(stacked, "total")  # column sums -1, 0, 0, 0.5: signs -, +, +, +
    assert total.tolist() == [
        [False, False, False, True],
        [True, False, False, False],
        [False, True, False, False],
    ]
    frequency = merge_utils.majority_sign_mask(stacked, "frequency")  # votes +1, -1, 0, -1
    assert frequency[:, 0].tolist() == [True, False, True]
    assert frequency[:, 3].tolist() == [False, True, True]
    mean = merge_utils.disjoint_mean(stacked, frequency)
    assert mean.tolist() == [1.0, -1.0, 0.0, -0.75]


@given(seed=st.integers(0, 2**16), out=st.integers(1, 9), inp=st.integers(1, 9), rank=st.integers(1, 12))
def test_low_rank_is_the_best_approximation_of_its_rank(seed: int, out: int, inp: int, rank: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(out, inp, generator=gen, dtype=torch.float64)
    b, a = merge_utils.low_rank(m, rank)
    assert b.shape == (out, rank)
    assert a.shape == (rank, inp)
    s = torch.linalg.svdvals(m)
    expected_error = s[rank:].square().sum().sqrt()  # Eckart-Young
    torch.testing.assert_close(torch.linalg.matrix_norm(m - b @ a), expected_error, atol=1e-9, rtol=1e-9)
    reduced = merge_utils.low_rank(m, rank, full_matrices=False)
    torch.testing.assert_close(reduced[0] @ reduced[1], b @ a)


def test_low_rank_clamp_bounds_both_factors() -> None:
    m = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    b, a = merge_utils.low_rank(m, 4)
    bc, ac = merge_utils.low_rank(m, 4, clamp=0.9)
    limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), 0.9)
    assert bc.abs().max() <= limit + 1e-6
    assert ac.abs().max() <= limit + 1e-6
    assert not torch.equal(bc, b)  # something was clamped
    half, _ = merge_utils.low_rank(m.half(), 4)
    assert half.dtype == torch.float16


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: merge_utils.combine("ties", _tasks(0, 2, (3,)), [1, 1]), "density"),
        (lambda: merge_utils.combine("ties", _tasks(0, 2, (3,)), [1, 1], density=1.5), r"\[0, 1\]"),
        (lambda: merge_utils.combine("nope", _tasks(0, 2, (3,)), [1, 1]), "unknown combination"),
        (lambda: merge_utils.combine("linear", _tasks(0, 2, (3,)), [1]), "2 task tensors but 1 weights"),
        (lambda: merge_utils.majority_sign_mask(torch.ones(2, 2), "mean"), "majority_sign_method"),
        (lambda: merge_utils.low_rank(torch.ones(2, 2), 0), "rank"),
    ],
)
def test_bad_arguments_are_config_errors(call: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        call()  # type: ignore[operator]
