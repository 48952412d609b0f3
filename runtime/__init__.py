"""The torch-free runtime: preprocessing, runners and :class:`Predictor`.

Needs numpy, Pillow and onnxruntime only; TensorRT and CUDA load lazily.
"""
