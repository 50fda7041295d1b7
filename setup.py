"""Package discovery for the four code folders shipped under the ``tfmq`` namespace.

pyproject.toml holds the metadata and maps each folder to its package (package-dir); this
file only lists the packages found under each folder, so a new target folder
(``targets/<name>/``) ships without editing a package list.
"""
from setuptools import find_packages, setup

ROOTS = {"tfmq": "tfmq", "tfmq.calibration": "calibration", "tfmq.exporter": "exporter", "tfmq.targets": "targets"}

setup(packages=[f"{ns}.{p}" if p else ns for ns, folder in ROOTS.items() for p in ["", *find_packages(folder)]])
