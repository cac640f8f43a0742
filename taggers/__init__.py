"""Taggers and captioners behind one protocol (WD14 ONNX, transformers VLMs, OpenAI-compatible servers)."""
