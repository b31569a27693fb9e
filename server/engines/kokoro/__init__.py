"""Kokoro-82M: the embedded int8 ONNX model and the PyTorch engine for official weights."""
