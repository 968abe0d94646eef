"""`pip install .` ships every module of dfqf_jax, with the dependencies of requirements.txt."""
import os
import re
import tomllib

import setuptools

from conftest import REPO


def pyproject() -> dict:
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    return tomllib.load(f)


def test_every_folder_of_python_files_in_the_package_is_installed():
  include = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
  installed = set(setuptools.find_packages(where=REPO, include=include))
  folders = {os.path.relpath(root, REPO).replace(os.sep, ".")
             for root, _, files in os.walk(os.path.join(REPO, "dfqf_jax"))
             if "__pycache__" not in root and any(f.endswith(".py") for f in files)}
  assert folders == installed  # a folder without __init__.py would be left out


def test_the_dependencies_are_requirements_txt_less_the_test_tools():
  def names(lines):
    return {re.split(r"[=<>~!\[ ;#]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in lines if line.strip() and not line.strip().startswith("#")}
  with open(os.path.join(REPO, "requirements.txt")) as f:
    required = names(f)
  project = pyproject()["project"]
  runtime, test = names(project["dependencies"]), names(project["optional-dependencies"]["test"])
  assert runtime | test == required and not runtime & test
