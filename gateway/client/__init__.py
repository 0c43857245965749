"""Python clients of Herald.

- ``HttpPublisher`` publishes from a backend through a node's HTTP API
  (``publisher.py``).
"""

from .publisher import HttpPublisher, PublishRefused

__all__ = ["HttpPublisher", "PublishRefused"]
