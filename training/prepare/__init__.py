"""Data preparation: offline emoji tasks, fusion lines and pretraining captions under the cache folder."""

from .pipeline import PrepareConfig, prepare

__all__ = ["PrepareConfig", "prepare"]
