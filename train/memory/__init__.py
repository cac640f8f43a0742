"""The memory planner (`sdprep train --plan`): planner.py (settings, the prediction, what fits),
profile.py (an architecture's measured activations; the full-size SDXL's are stored in
sdxl_memory_profile.json), trace.py (measuring a step on fake tensors), memtrack.py (live bytes)."""
