"""Placeholder replaced in the demo commit."""
from dataclasses import dataclass


@dataclass
class DemoConfig:
    pass


def demo(cfg):
    raise NotImplementedError
