"""How the network runs on a device: the backend choice (torch, TensorRT, torch.compile) with its reasons, the
TensorRT engine cache, and the accelerated encoder wrappers. Heavy packages (tensorrt, polygraphy, onnx) import
lazily, only where a backend that needs them is tried; every failure falls back to plain PyTorch with its reason.
"""
