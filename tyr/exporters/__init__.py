"""Exports that runtimes load, each checked against PyTorch before it is called done: vllm/ and onnx/."""
