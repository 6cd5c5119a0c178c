"""Hypothesis strategies for property-based gradient tests of your own ops.

    from hypothesis import given
    import minirlhf as mr
    from minirlhf.testing import broadcastable_arrays

    @given(broadcastable_arrays(2, away_from=[0.0]))
    def test_mul_relu_gradient(xs):
        a, b = xs                      # float64 arrays of shapes like (3, 1) and (4,), or () and (2, 2)
        assert mr.gradcheck(lambda a, b: (a * b).relu(), [a, b])

Every strategy draws NumPy arrays (float64 unless told otherwise) of finite, bounded values, because
central differences need a smooth neighbourhood of every input: keep inputs away from kinks
(``away_from=[0.0]`` for relu or abs) and give ``max`` a unique winner (`unique_max_arrays`).
Shapes include 0-d arrays and size-1 axes, where broadcasting bugs hide.

hypothesis is an optional dependency (``pip install 'minirlhf[test]'``): ``import minirlhf`` does not
import this module.
"""

import math

import numpy as np

try:
    from hypothesis import strategies as st
    from hypothesis.extra import numpy as hnp
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("minirlhf.testing needs hypothesis: pip install 'minirlhf[test]'") from e

__all__ = ["shapes", "arrays", "broadcastable_shapes", "broadcastable_arrays", "unique_max_arrays",
           "logits", "int_targets"]


def shapes(min_dims=0, max_dims=3, min_side=1, max_side=4):
    """Array shapes such as (), (1,), (3, 1, 4): ``shapes(min_dims=1)`` for ops that need an axis.

    With ``min_dims=0`` the 0-d shape () comes often: hypothesis alone rarely draws it, and NumPy's
    0-d results (scalars, not arrays) are where in-place updates go wrong.
    """
    general = hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=min_side,
                               max_side=max_side)
    if min_dims > 0:
        return general
    return st.integers(0, 4).flatmap(lambda k: st.just(()) if k == 4 else general)


def arrays(shape=None, dtype=np.float64, min_value=-3.0, max_value=3.0, away_from=None, margin=0.1):
    """Arrays of finite values in [min_value, max_value], each at least ``margin`` from every kink.

    ``shape``: a tuple or a strategy of shapes (default `shapes()`). ``away_from``: points where the
    function under test is not differentiable, e.g. ``arrays((2, 3), away_from=[0.0])`` for relu.
    """
    dtype = np.dtype(dtype)
    shape = shapes() if shape is None else shape
    elements = st.floats(min_value, max_value, allow_nan=False, allow_infinity=False,
                         width=8 * dtype.itemsize)
    if away_from:
        kinks = [float(k) for k in away_from]

        def push_out(v):
            # a value inside a kink's margin moves to its edge (a filter alone would reject too much)
            for k in kinks:
                if abs(v - k) < margin:
                    v = k + math.copysign(1.01 * margin, v - k if v != k else 1.0)
            return float(dtype.type(v))

        def allowed(v):
            return min_value <= v <= max_value and all(abs(v - k) >= margin for k in kinks)

        elements = elements.map(push_out).filter(allowed)
    return hnp.arrays(dtype, shape, elements=elements)


def broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4):
    """Tuples of ``num_shapes`` shapes that broadcast together, e.g. ((3, 1), (4,)) or ((), (2, 2))."""
    return hnp.mutually_broadcastable_shapes(num_shapes=num_shapes, min_dims=min_dims,
                                             max_dims=max_dims, min_side=1,
                                             max_side=max_side).map(lambda b: b.input_shapes)


@st.composite
def broadcastable_arrays(draw, n=2, min_dims=0, max_dims=3, max_side=4, **array_kwargs):
    """A tuple of ``n`` arrays whose shapes broadcast together (for binary ops, `where`, ...).

    ``array_kwargs`` go to `arrays`: ``broadcastable_arrays(2, min_value=0.5)`` for a positive base.
    """
    shapes_ = draw(broadcastable_shapes(n, min_dims, max_dims, max_side))
    return tuple(draw(arrays(shape, **array_kwargs)) for shape in shapes_)


@st.composite
def unique_max_arrays(draw, shape=None, dtype=np.float64, min_value=-3.0, max_value=3.0):
    """Arrays whose elements all differ, so a ``max`` over any axes has one winner.

    Elements sit on a grid of 2·size + 1 levels in [min_value, max_value], so neighbours are far
    more than gradcheck's eps apart: ``x.max(axis=0)`` has a well-defined gradient at every draw.
    (Ties split the gradient evenly; that convention is pinned by exact tests, not sampled.)
    """
    shape = shapes() if shape is None else shape
    if not isinstance(shape, tuple):
        shape = draw(shape)
    size = math.prod(shape)
    levels = 2 * size + 1
    ranks = draw(st.permutations(range(levels)))[:size]
    step = (max_value - min_value) / (levels - 1)
    return (min_value + step * np.array(ranks, dtype=np.float64)).reshape(shape).astype(dtype)


@st.composite
def logits(draw, batch_shape=None, num_classes=None, scale=5.0, dtype=np.float64):
    """Logits of shape batch_shape + (V,), values in [-scale, scale].

    Defaults: 0 to 2 batch axes of 1 to 4, and V from 2 to 5 classes; e.g. ``logits(num_classes=3)``.
    """
    if batch_shape is None:
        batch_shape = draw(shapes(min_dims=0, max_dims=2))
    if num_classes is None:
        num_classes = draw(st.integers(2, 5))
    return draw(arrays(tuple(batch_shape) + (num_classes,), dtype, -scale, scale))


@st.composite
def int_targets(draw, shape, num_classes, ignore_index=None):
    """int64 class ids in [0, num_classes) of ``shape`` (also token ids for embedding).

    With ``ignore_index``, some entries take that value. For logits ``z`` drawn with `logits`:
    ``int_targets(z.shape[:-1], z.shape[-1], ignore_index=-100)``.
    """
    ids = st.integers(0, num_classes - 1)
    if ignore_index is not None:
        ids = ids | st.just(ignore_index)
    return draw(hnp.arrays(np.int64, tuple(shape), elements=ids))
