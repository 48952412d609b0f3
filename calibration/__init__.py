"""INT8 calibration from image folders: TensorRT caches, Q/DQ ONNX and CPU INT8 ONNX.

Only :mod:`memexport.calibration.calibrate` is imported here, and it imports ``onnx`` and
ONNX Runtime lazily, so ``import memexport.calibration`` stays cheap.
"""

from memexport.calibration.calibrate import CalibrationOptions, CalibrationResult, calibration_cache_from_images

__all__ = ["CalibrationOptions", "CalibrationResult", "calibration_cache_from_images"]
