"""ONNX: the export of a bundle to graphs checked against PyTorch (:mod:`.export`) and their runtime, which needs
onnxruntime and not PyTorch (:mod:`.runtime`)."""
