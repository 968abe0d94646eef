"""Evaluate every checkpoint in DIR on the test split; writes DIR/results.json.

python main.py --config=configs/evaluate.py --workdir=DIR --config.data.dir=../shared/data
"""
from configs.common import base_config


def get_config():
  return base_config("evaluate")
