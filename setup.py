"""Build script for pcfast.

The compiled extension ``pcfast._C`` is added by the kernels work; until then this file only
maps the top-level ``kernels/`` folder to the importable package ``pcfast.kernels``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["pcfast", "pcfast.*"]) + ["pcfast.kernels"]

setup(
    packages=packages,
    package_dir={"pcfast.kernels": "kernels"},
)
