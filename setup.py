"""Maps the one import name `sdprep` onto the repository's top-level folders; everything else is in pyproject.toml."""

from setuptools import find_namespace_packages, setup

ROOTS = {"sdprep": "sdprep", "sdprep.prep": "prep", "sdprep.train": "train", "sdprep.taggers": "taggers"}

packages = []
for name, folder in ROOTS.items():
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_namespace_packages(folder) if "__pycache__" not in sub]

setup(packages=packages, package_dir=ROOTS)
