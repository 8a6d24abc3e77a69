"""Conditioning channels of the pix2pix generator: foreground, contours, types, option layer, noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.gan.conditioning import (
    build_conditioning,
    conditioning_channels,
    instance_edges,
    option_value,
    render_conditioning,
)
from histosynth.errors import HistosynthError

torch.set_num_threads(1)


def _touching() -> tuple[np.ndarray, np.ndarray]:
    """Two touching 3x3 nuclei (ids 1 and 2, types 1 and 2) on an 8x8 background."""
    inst = np.zeros((8, 8), np.int32)
    inst[2:5, 1:4] = 1
    inst[2:5, 4:7] = 2
    types = np.zeros((8, 8), np.uint8)
    types[inst == 1] = 1
    types[inst == 2] = 2
    return inst, types


def test_channel_names():
    assert conditioning_channels(3, False) == ["foreground", "edges", "type_1", "type_2", "type_3", "option"]
    assert conditioning_channels(0, True) == ["foreground", "edges", "option", "noise"]


def test_edges_separate_touching_nuclei():
    inst, types = _touching()
    cond = build_conditioning(inst, types, n_types=2, option=0, n_options=1)
    assert cond.shape == (1, 5, 8, 8) and cond.dtype == torch.float32
    fg, edges = cond[0, 0] > 0, cond[0, 1] > 0
    assert torch.equal(fg, torch.from_numpy(inst > 0))
    # both sides of the contact between nucleus 1 (cols 1-3) and nucleus 2 (cols 4-6) are contour
    assert edges[2:5, 3].all() and edges[2:5, 4].all()
    # only the centre pixel of each 3x3 nucleus is interior; background is never an edge
    assert not edges[3, 2] and not edges[3, 5]
    assert not (edges & ~fg).any()
    assert int(edges.sum()) == 2 * 8
    # removing the contour splits the foreground into the two nuclei
    assert torch.equal(instance_edges(torch.from_numpy(inst).long()), edges)


def test_type_one_hot_and_value_range():
    inst, types = _touching()
    cond = build_conditioning(inst, types, 3, 0, 1)
    on = cond[0, 2:5] > 0
    assert torch.equal(on[0], torch.from_numpy(types == 1))
    assert torch.equal(on[1], torch.from_numpy(types == 2))
    assert not on[2].any()  # type 3 absent
    assert set(cond[0, :5].unique().tolist()) == {-1.0, 1.0}
    assert cond.min() >= -1 and cond.max() <= 1


def test_option_layer_is_constant():
    inst, types = _touching()
    batch_inst, batch_types = np.stack([inst] * 3), np.stack([types] * 3)
    cond = build_conditioning(batch_inst, batch_types, 2, np.array([0, 1, 2]), 3)
    opt = cond[:, 4]
    assert [float(v) for v in opt.flatten(1).unique(dim=1).flatten()] == [-1.0, 0.0, 1.0]
    assert (cond[:, 4] == cond[:, 4, :1, :1]).all()
    assert option_value(0, 1) == 0.0 and option_value(1, 2) == 1.0
    single = build_conditioning(inst, types, 2, 0, 1)
    assert (single[0, 4] == 0).all()
    with pytest.raises(HistosynthError, match="option 2"):
        build_conditioning(inst, types, 2, 2, 2)


def test_noise_reproducible_and_torch_input():
    inst, types = _touching()
    a = build_conditioning(inst, types, 2, 0, 2, noise=True, generator=torch.Generator().manual_seed(3))
    b = build_conditioning(torch.from_numpy(inst), torch.from_numpy(types), 2, 0, 2, noise=True,
                           generator=torch.Generator().manual_seed(3))
    c = build_conditioning(inst, types, 2, 0, 2, noise=True, generator=torch.Generator().manual_seed(4))
    assert a.shape == (1, 6, 8, 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(float(a[0, 5].std()) - 1) < 0.5


def test_bad_inputs():
    inst, types = _touching()
    with pytest.raises(HistosynthError, match="knows 1 types"):
        build_conditioning(inst, types, 1, 0, 1)
    with pytest.raises(HistosynthError, match="must both be"):
        build_conditioning(inst, types[:4], 2, 0, 1)
    with pytest.raises(HistosynthError, match="options for"):
        build_conditioning(np.stack([inst] * 2), np.stack([types] * 2), 2, [0, 0, 0], 1)


def test_render():
    inst, types = _touching()
    rgb = render_conditioning(build_conditioning(inst, types, 2, 0, 1), 2)
    assert rgb.shape == (1, 8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb[0, 0, 0] == 0).all() and (rgb[0, 2, 3] == 1).all()
