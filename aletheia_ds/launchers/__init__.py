"""Launchers around train.main: Ray Train (ray.py)."""
