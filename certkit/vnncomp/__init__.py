"""VNN-COMP: solve ONNX + VNN-LIB instances (run-instance) and run whole benchmarks."""
