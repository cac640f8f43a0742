"""The SDXL models: loading a folder, single file or hub id; the tiny and topology-true test models."""
