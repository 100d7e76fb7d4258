"""The sparecycles node daemon: asks the coordinator for work over MQTT, runs ONNX models with
one single-threaded ONNX Runtime session per slot, and sends signed results back.

Imports `protocol` only. Entry points: `python -m node` (`node.__main__.main`) and
`node.worker.run_node` for embedding and tests.
"""
