"""The training config: its schema (kohya's names), kohya's keys and dataset TOMLs, checks before a run."""
