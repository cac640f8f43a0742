"""Dataset preparation stages: one module per stage, plus their thin click commands in prep.cli."""
