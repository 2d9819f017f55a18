"""From DICOM series to label maps: geometry, model cards and registry, ONNX Runtime inference."""
