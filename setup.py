"""Package list for setuptools (metadata lives in pyproject.toml).

The methods live in the top-level ``pipelines/`` folder (the design card's layout) but are installed
and imported as ``sr_diffusion.pipelines``; this maps every subpackage found there.
"""

from setuptools import find_packages, setup

packages = ["sr_diffusion", *(f"sr_diffusion.{name}" for name in find_packages("sr_diffusion"))]
packages += ["sr_diffusion.pipelines", *(f"sr_diffusion.pipelines.{name}" for name in find_packages("pipelines"))]

setup(packages=packages, package_dir={"sr_diffusion": "sr_diffusion", "sr_diffusion.pipelines": "pipelines"})
