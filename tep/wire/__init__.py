"""The OpenAI wire format: the field table, request parsing per endpoint, response shapes
and the OpenAPI document generated from the same table."""
