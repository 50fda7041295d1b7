"""Per-device targets (tfmq.targets): each reads the exporter's artifacts and targets/base.py
only, and imports its runtime SDK inside the functions that need it."""
