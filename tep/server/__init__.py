"""The web layer: the Quart app, the ASGI fast path in front of it, the request prelude
both share, the ``tep`` command and Ray Serve replicas."""
