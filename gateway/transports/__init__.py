"""The transports that carry sessions: WebSocket, SSE, and what comes next.

``contract.Transport`` is all a session knows of its connection; each
transport lives in its own module, and ``registry.KINDS`` lists them (routes,
metrics labels and ``/api/stats`` follow it).
"""
