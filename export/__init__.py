"""edgegen.export: Gemma 4 target + assistant pair -> verified ONNX bundle.

Imports torch and transformers where it loads models (lazily, so option errors are instant); the
runtime (`edgegen.runtime`) never does.
"""
