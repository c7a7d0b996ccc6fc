"""LitServe's OpenAISpec with an instant model, for the server benchmark.

    python benchmarks/_litserve_app.py PORT

The model does no compute: ``predict`` yields ``max_tokens`` characters of fixed text, one
per token (the same text and token count as tep's toy backend in instant mode), and
LitServe's OpenAISpec turns them into /v1/chat/completions responses and streams.
One inference worker and one API server process (LitServe's defaults on CPU).
LITSERVE_FAST_QUEUE=1 turns on LitServe's ZeroMQ queue (``fast_queue=True``); in two
paired runs on the 2-core machine it was 83 vs 57 and 51 vs 78 req/s against the default,
no consistent gain, so the benchmark keeps LitServe's default.
"""
from __future__ import annotations

import os
import sys

import litserve as ls

_TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. ")


class InstantAPI(ls.LitAPI):
    """An OpenAI chat model that emits fixed text instantly."""

    def setup(self, device):  # noqa: ANN001 - LitServe hook
        pass

    def predict(self, request):  # noqa: ANN001 - the ChatCompletionRequest
        n = request.max_tokens or getattr(request, "max_completion_tokens", None) or 256
        for i in range(n):
            yield _TEXT[i % len(_TEXT)]


def main() -> None:
    port = int(sys.argv[1])
    server = ls.LitServer(InstantAPI(spec=ls.OpenAISpec()), accelerator="cpu", devices=1,
                          workers_per_device=1, timeout=False,
                          fast_queue=os.environ.get("LITSERVE_FAST_QUEUE") == "1")
    server.run(host="127.0.0.1", port=port, log_level="warning", num_api_servers=1,
               generate_client_file=False)


if __name__ == "__main__":
    main()
