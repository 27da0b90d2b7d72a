"""The layer graph against the paper's Table 2, computed independently here, and its passes."""

from __future__ import annotations

import pytest

import vggspec
from vggspec.graph import PassError, fully_conv

# Table 1, written out independently of specs/: widths per stage, 1 marks a conv1 layer.
TABLE1 = {
    "A": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "A-LRN": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "B": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "C": [[64, 64], [128, 128], [256, 256, (1, 256)], [512, 512, (1, 512)], [512, 512, (1, 512)]],
    "D": [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    "E": [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}
TABLE2 = {
    "A": 132_863_336,
    "A-LRN": 132_863_336,
    "B": 133_047_848,
    "C": 133_638_952,
    "D": 138_357_544,
    "E": 143_667_240,
}


def independent_count(stages: list[list]) -> tuple[int, int]:
    """Parameters and MACs at 224 x 224 from Table 1 by hand: k*k*cin*cout + cout per conv, and the FCs."""
    params = macs = 0
    cin, side = 3, 224
    for stage in stages:
        for layer in stage:
            k, cout = layer if isinstance(layer, tuple) else (3, layer)
            params += k * k * cin * cout + cout
            macs += k * k * cin * cout * side * side
            cin = cout
        side //= 2
    for fin, fout in ((cin * side * side, 4096), (4096, 4096), (4096, 1000)):
        params += fin * fout + fout
        macs += fin * fout
    return params, macs


@pytest.mark.parametrize("config", TABLE2)
def test_table2_parameter_counts(config: str):
    graph = vggspec.load_spec(config)
    params, macs = independent_count(TABLE1[config])
    assert graph.params == params == TABLE2[config]
    assert graph.macs == macs


def test_d_costs_15_47_gmacs():
    assert vggspec.load_spec("D").macs == 15_470_264_320


def test_shapes_and_receptive_fields_of_d():
    g = vggspec.load_spec("D")
    assert g.layer("pool5").out_shape == (512, 7, 7)
    assert g.layer("fc6").in_shape == (25088,)
    # Section 2.3: two stacked 3x3 layers see 5x5, three see 7x7.
    assert g.layer("conv1_1").rf == (3, 3) and g.layer("conv1_2").rf == (5, 5)
    assert g.layer("conv3_3").rf[0] - g.layer("pool2").rf[0] == 3 * 2 * 4
    assert g.layer("pool5").rf == (212, 212) and g.layer("pool5").jump == 32


def test_conv1_keeps_the_receptive_field():
    g = vggspec.load_spec("C")
    assert g.layer("conv3_3").rf == g.layer("conv3_2").rf
    assert g.layer("conv3_3").params == 256 * 256 + 256


def test_fully_conv_pass_derives_the_kernel():
    dense = fully_conv(vggspec.load_spec("D"))
    fc6 = dense.layer("fc6")
    assert fc6.op == "conv" and fc6.attrs["kernel"] == 7 and fc6.attrs["from_fc"]
    assert dense.layer("fc7").attrs["kernel"] == 1
    assert "flatten" not in dense and dense.layer("mean").out_shape == (1000,)
    assert dense.params == vggspec.load_spec("D").params
    at = fully_conv(vggspec.load_spec("D"), (288, 352))
    assert at.layer("fc8").out_shape == (1000, 3, 5)


def test_fully_conv_kernel_follows_the_input():
    g = vggspec.loads_spec("input: 64x96\nconv3-4 maxpool maxpool FC-8 FC-2 soft-max")
    assert fully_conv(g).layer("fc3").attrs["kernel"] == (16, 24)


def test_fully_conv_refuses_a_too_small_input():
    with pytest.raises(PassError, match="too small"):
        fully_conv(vggspec.load_spec("D"), (200, 200))


def test_graph_is_a_networkx_chain():
    import networkx as nx

    g = vggspec.load_spec("B")
    assert nx.is_directed_acyclic_graph(g)
    assert list(nx.topological_sort(g))[0] == "input"
    assert all(g.out_degree(n) <= 1 for n in g)
