"""Sample images during training from kohya prompt files."""
