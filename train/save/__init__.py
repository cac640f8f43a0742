"""What training writes: weights with kohya's metadata, training states, fine-tuned single files."""
