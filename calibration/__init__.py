"""INT8 calibration from image folders: TensorRT caches, Q/DQ ONNX and CPU INT8 ONNX."""
