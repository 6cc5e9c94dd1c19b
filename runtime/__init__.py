"""edgegen.runtime: run an exported bundle with numpy + onnxruntime. Never imports torch or transformers."""
