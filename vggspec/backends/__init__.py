"""Backends: the layer graph as PyTorch source (torch.py) and as an ONNX graph (onnx.py)."""
