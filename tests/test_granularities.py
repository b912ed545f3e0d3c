import pytest
import torch

from hywia_lightning.granularities import (
    Element1, Element2, Granularity, Magnitude, Random, Vector, check_scores, make_granularity,
)
from hywia_lightning.unit_groups import UnitGroup


def group(weights, grads=None, sq_grads=None, name="layers.0.mlp"):
    as_tuple = lambda ts: None if ts is None else tuple(torch.tensor(t, dtype=torch.float32) for t in ts)
    w = as_tuple(weights)
    return UnitGroup(name, "mlp", 0, 1, w[0].shape[0], w, as_tuple(grads), as_tuple(sq_grads))


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


def test_element2_adds_the_fisher_curvature_term():
    # unit 0: |2 - 0.5*1*4| + |-2 - 0.5*4*1| + |0 - 0.5*9*1| = 0 + 4 + 4.5
    # unit 1: |1 - 0| + |2 - 0| + |1 - 0.5*1*2| = 3
    assert Element2()(group(W, G, F)).tolist() == [8.5, 3.0]


def test_magnitude_is_the_squared_norm_of_the_unit():
    assert Magnitude()(group(W)).tolist() == [1 + 4 + 9, 1 + 4 + 1]


def test_random_is_seeded_per_group_and_seed():
    g = group(W)
    assert torch.equal(Random(3)(g), Random(3)(g))
    assert not torch.equal(Random(3)(g), Random(4)(g))
    assert not torch.equal(Random(3)(g), Random(3)(group(W, name="layers.1.mlp")))


def test_gradient_granularities_refuse_a_group_without_statistics():
    with pytest.raises(ValueError, match="needs gradient statistics"):
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
    from callbacks.wanda import WandaActivation

    g = group(W)
    norms = tuple(torch.tensor(n) for n in ([[1.0, 10.0], [1.0, 10.0]], [[2.0], [2.0]]))
    g = UnitGroup(g.name, g.kind, g.layer, g.num_layers, g.num_units, g.weights, None, None, norms)
    # unit 0: 1·1 + 2·10 + 3·2 = 27;  unit 1: 1·1 + 2·10 + 1·2 = 23
    assert WandaActivation()(g).tolist() == [27.0, 23.0]
    with pytest.raises(ValueError, match="needs the input norms"):
        WandaActivation()(group(W))
