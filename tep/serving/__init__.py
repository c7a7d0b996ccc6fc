"""Per-endpoint request handling, independent of the web framework: parsing into
requests, admission, backend calls in the worker pool, replies and server-sent events."""
