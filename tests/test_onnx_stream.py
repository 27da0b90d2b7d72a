"""The streamed writer writes the very ModelProto that onnx.save_model writes; mapped checkpoints read back exactly."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

import vggspec
from vggspec.backends.onnx_stream import write_streamed
from vggspec.weights import Checkpoint, init_weights, load_checkpoint, save_checkpoint

SPEC = "name: s\ninput: 32x32x3\nnorm: batch\nconv3-8 maxpool conv3-16 maxpool FC-16 FC-4 soft-max\n"


def test_streamed_equals_save_model(tmp_path):
    arrays = {
        "w32": np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32),
        "w16": np.arange(12, dtype=np.float16).reshape(3, 4),
        "n64": np.array(7, dtype=np.int64),
        "empty": np.zeros((0,), np.float32),
    }
    node = helper.make_node("Identity", ["w32"], ["y"], name="id")
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 3, 3, 3])
    skeleton = helper.make_model(helper.make_graph([node], "g", [], [y]))
    full = onnx.ModelProto()
    full.CopyFrom(skeleton)
    full.graph.initializer.extend(numpy_helper.from_array(a, n) for n, a in arrays.items())
    write_streamed(skeleton, arrays.items(), tmp_path / "streamed.onnx")
    assert onnx.load(str(tmp_path / "streamed.onnx")) == full


def test_export_writes_the_in_memory_model(tmp_path):
    graph = vggspec.loads_spec(SPEC)
    weights = init_weights(graph, seed=3)
    for options in ({}, {"fully_conv": True, "flip": True, "scores": True}, {"precision": "fp16"}):
        written = tmp_path / "m.onnx"
        skeleton = vggspec.export_onnx(graph, written, weights=weights, **options)
        in_memory = vggspec.export_onnx(graph, weights=weights, **options)
        assert onnx.load(str(written)) == in_memory
        assert not skeleton.graph.initializer and skeleton.graph.node == in_memory.graph.node


def test_mapped_checkpoint_reads_back_and_stays_private(tmp_path):
    graph = vggspec.loads_spec(SPEC)
    weights = init_weights(graph, seed=1)
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, Checkpoint(weights, SPEC))
    loaded = load_checkpoint(path).tensors
    assert loaded.keys() == weights.keys()
    for key, value in weights.items():
        assert loaded[key].shape == value.shape and np.array_equal(loaded[key], value)
    loaded["conv1_1.weight"][...] = 0  # copy-on-write: the file keeps its values
    assert np.array_equal(load_checkpoint(path).tensors["conv1_1.weight"], weights["conv1_1.weight"])


def test_graph_check_sees_the_weights_shapes():
    """The checker runs on the skeleton with the weights as typed inputs: a wrong shape still fails it."""
    import pytest

    from vggspec.backends.onnx import _Options, build_model
    from vggspec.backends.onnx_stream import check_graph
    from vggspec.errors import ModelError

    graph = vggspec.loads_spec(SPEC)
    arrays: dict[str, np.ndarray] = {}
    opts = _Options(False, False, False, False, "fp32", 17, graph.meta.preprocessing)
    skeleton = build_model(graph, init_weights(graph), opts, (), arrays)
    check_graph(skeleton, arrays)
    arrays["fc4.weight"] = np.zeros((16, 7), np.float32)
    with pytest.raises(ModelError, match="fails onnx.checker"):
        check_graph(skeleton, arrays)
