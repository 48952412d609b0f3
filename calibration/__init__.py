"""INT8 calibration from image folders: TensorRT caches, Q/DQ ONNX and CPU INT8 ONNX.

Only :mod:`memexport.calibration.stages` is imported here, and it imports ``onnx`` and
ONNX Runtime lazily, so ``import memexport.calibration`` stays cheap.
"""

from memexport.calibration.stages import CalibrationOptions, CalibrationResult, calibrate

__all__ = ["CalibrationOptions", "CalibrationResult", "calibrate"]
