import pytest
import torch

from hywia_lightning.core.compensation import compensated_error, damped
from hywia_lightning.core.granularities import (
    OBS, Element1, Element2, Fluctuation, Granularity, Magnitude, Random, Vector, Vector2, Wanda, check_scores,
    make_granularity,
)
from hywia_lightning.core.unit_groups import GroupKey, UnitGroup


def group(weights, grads=None, sq_grads=None, layer=0, **statistics):
    as_tuple = lambda ts: None if ts is None else tuple(torch.tensor(t, dtype=torch.float32) for t in ts)
    w = as_tuple(weights)
    return UnitGroup(GroupKey(layer, "mlp"), 1, w[0].shape[0], w, 1, as_tuple(grads), as_tuple(sq_grads), **statistics)


# two units, two coupled tensors; unit 0 has w·g terms that cancel, unit 1 has terms that add
W = [[[1.0, -2.0], [1.0, 2.0]], [[3.0], [1.0]]]
G = [[[2.0, 1.0], [1.0, 1.0]], [[0.0], [1.0]]]
F = [[[4.0, 1.0], [0.0, 0.0]], [[1.0], [2.0]]]


def test_element1_sums_absolute_elementwise_taylor_terms():
    # unit 0: |2| + |-2| + |0| = 4;  unit 1: |1| + |2| + |1| = 4
    assert Element1()(group(W, G, F)).tolist() == [4.0, 4.0]


def test_vector_takes_the_taylor_term_of_the_whole_unit():
    # unit 0: |2 - 2 + 0| = 0 (cancels);  unit 1: |1 + 2 + 1| = 4
    assert Vector()(group(W, G, F)).tolist() == [0.0, 4.0]


def test_element2_is_the_diagonal_fisher_saliency():
    # unit 0: ½(1·4 + 4·1 + 9·1) = 8.5;  unit 1: ½(1·0 + 4·0 + 1·2) = 1  (no gradient term: OBD)
    assert Element2()(group(W, G, F)).tolist() == [8.5, 1.0]


def test_vector2_is_the_mean_square_of_per_window_unit_saliency():
    saliency = torch.tensor([[1.0, -2.0], [3.0, 2.0]])  # windows × units: Σ_unit w·g_j
    assert Vector2()(group(W, window_saliency=saliency)).tolist() == [5.0, 4.0]
    with pytest.raises(ValueError, match="needs window_saliency"):
        Vector2()(group(W))


def test_fluctuation_weighs_the_output_columns_by_their_input_variance():
    # the output member (index 1, one column per unit): var 2 and 3, weights 3 and 1 → 2·9, 3·1
    variance = tuple(torch.tensor(v) for v in ([[5.0, 5.0], [5.0, 5.0]], [[2.0], [3.0]]))
    assert Fluctuation()(group(W, input_variance=variance)).tolist() == [18.0, 3.0]


def test_magnitude_is_the_squared_norm_of_the_unit():
    assert Magnitude()(group(W)).tolist() == [1 + 4 + 9, 1 + 4 + 1]


def test_random_is_seeded_per_group_and_seed():
    g = group(W)
    assert torch.equal(Random(3)(g), Random(3)(g))
    assert not torch.equal(Random(3)(g), Random(4)(g))
    assert not torch.equal(Random(3)(g), Random(3)(group(W, layer=1)))


def test_gradient_granularities_refuse_a_group_without_statistics():
    with pytest.raises(ValueError, match="needs grads"):
        Element1()(group(W))


def test_unknown_granularity_lists_the_allowed_names():
    with pytest.raises(ValueError, match="granularity='taylor' is unknown; allowed: random, magnitude, element1"):
        make_granularity("taylor")


def test_scores_of_the_wrong_shape_or_nan_are_refused():
    g = group(W)

    class Broken(Granularity):
        def __call__(self, group):
            return torch.zeros(3)

    with pytest.raises(ValueError, match=r"returned \(3,\) for layers.0.mlp; expected \(2,\)"):
        check_scores(Broken()(g), g, Broken())
    with pytest.raises(ValueError, match="NaN"):
        check_scores(torch.tensor([0.0, float("nan")]), g, Broken())


def test_wanda_weighs_each_element_by_its_input_norm():
    norms = tuple(torch.tensor(n) for n in ([[1.0, 10.0], [1.0, 10.0]], [[2.0], [2.0]]))
    # unit 0: 1·1 + 2·10 + 3·2 = 27;  unit 1: 1·1 + 2·10 + 1·2 = 23
    assert Wanda()(group(W, input_norms=norms)).tolist() == [27.0, 23.0]
    with pytest.raises(ValueError, match="needs input_norms"):
        Wanda()(group(W))


def obs_group(weight, covariance, units):
    """A group whose output member is ``weight`` [out, in], ``in / units`` input features per unit."""
    return UnitGroup(GroupKey(0, "mlp"), 1, units, (weight.t().reshape(units, -1),), 0, output_covariance=covariance)


@pytest.mark.parametrize("units", [12, 4])  # one feature per unit (MLP channels), three per unit (heads)
def test_obs_scores_are_the_error_left_after_the_refit_compensates_the_units_removed_so_far(units):
    torch.manual_seed(0)
    x = torch.randn(400, 12, dtype=torch.float64) @ torch.randn(12, 12, dtype=torch.float64)
    x[:, 3] = x[:, 7] + 0.01 * torch.randn(400, dtype=torch.float64)  # feature 3 is all but a copy of 7
    weight, covariance = torch.randn(5, 12, dtype=torch.float64), torch.cov(x.T)
    damping = 1e-9
    scores = OBS(damping=damping, steps=units)(obs_group(weight, covariance, units))
    order = scores.argsort().tolist()  # one unit per greedy step, cheapest first
    d = 12 // units
    for m in range(1, units + 1):
        gone = {f for u in order[:m] for f in range(u * d, (u + 1) * d)}
        kept = [f for f in range(12) if f not in gone]
        assert scores[order[m - 1]].item() == pytest.approx(
            compensated_error(weight.t(), damped(covariance, damping), kept), rel=1e-6, abs=1e-12)
        # the same error by brute force: what the least-squares refit of the kept features leaves
        x_c = x - x.mean(0)
        fit = torch.linalg.lstsq(x_c[:, kept], x_c @ weight.t()).solution if kept else 0
        left = (x_c @ weight.t() - (x_c[:, kept] @ fit if kept else 0)).pow(2).sum() / (len(x) - 1)
        assert scores[order[m - 1]].item() == pytest.approx(left.item(), rel=1e-3, abs=1e-9)
    if units == 12:  # the near copy goes first: its twin compensates it, however much it fluctuates
        assert order[0] in (3, 7)
        fluctuation = weight.pow(2).sum(0) * covariance.diagonal()
        assert fluctuation.argmin().item() not in (3, 7)


def test_obs_removes_several_units_per_step_and_refuses_bad_settings():
    torch.manual_seed(1)
    x = torch.randn(300, 16, dtype=torch.float64)
    coarse = OBS(steps=4)(obs_group(torch.randn(4, 16, dtype=torch.float64), torch.cov(x.T), 16))  # 4 features per step
    assert torch.all(coarse[coarse.argsort()].diff() > 0)  # rising with the removal order, no ties
    with pytest.raises(ValueError, match="damping > 0 and steps >= 1"):
        OBS(damping=0.0)
    with pytest.raises(ValueError, match="needs output_covariance"):
        OBS()(group(W))


def test_a_granularity_must_score_one_group_or_all_groups():
    from hywia_lightning.core.granularities import Granularity

    with pytest.raises(TypeError, match="Nothing must implement __call__.group. .* or score_groups"):
        type("Nothing", (Granularity,), {})
    joint = type("Joint", (Granularity,), {"score_groups": lambda self, groups, context: None})
    with pytest.raises(TypeError, match="granularity 'joint' scores all groups jointly"):
        joint()(None)


@pytest.mark.parametrize("kwargs, message", [
    ({"target_ratio": 1.0}, r"target_ratio=1.0 must be in \(0, 1\)"),
    ({"target_ratio": 0.2, "attention_unit": "heads"}, "attention_unit='heads' is unknown; allowed: query_heads"),
    ({"target_ratio": 0.2, "heads_to_keep": 0}, "heads_to_keep=0 must be at least 1"),
    ({"target_ratio": 0.2, "round_to": 0}, "round_to=0 must be at least 1"),
])
def test_a_pruning_scope_refuses_what_no_plan_can_meet(kwargs, message):
    from hywia_lightning import PruningScope

    with pytest.raises(ValueError, match=message):
        PruningScope(**kwargs)
