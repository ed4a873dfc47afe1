"""The formats other tools read and write, to and from clipper models: open_clip state dicts and
checkpoint files (`open_clip`), open_clip's local-dir folders (`open_clip_dir`), Hugging Face
transformers folders (`hf`), and ONNX graphs (`onnx_export` writes them, `onnx_model` runs them)."""
