"""LitServe's continuous-batching loop over an instant model, for bench_engine.py.

    python benchmarks/_litserve_cb_app.py PORT MAX_BATCH_SIZE

``ContinuousBatchingLoop`` with ``max_batch_size`` sequences: every ``step`` produces one
token for each active sequence (the model does no compute: the next byte of a fixed
lorem-ipsum text, as tep's toy model in instant mode), and LitServe streams each token to
its client. POST /predict with ``{"max_tokens": N}``; each streamed line is one token.
One inference worker and one API server process (LitServe's defaults on CPU).
"""
from __future__ import annotations

import sys

import litserve as ls
from litserve.loops import ContinuousBatchingLoop, Output
from litserve.utils import LitAPIStatus

_TEXT = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor "
         "incididunt ut labore et dolore magna aliqua. ")


class InstantBatchedAPI(ls.LitAPI):
    """Holds the active sequences; ``step`` advances all of them by one token."""

    def setup(self, device):  # noqa: ANN001 - LitServe hook
        self.active: dict[str, list[int]] = {}   # uid -> [tokens done, max_tokens]

    def decode_request(self, request):  # noqa: ANN001
        return int(request.get("max_tokens", 16))

    def add_request(self, uid, request):  # noqa: ANN001
        self.active[uid] = [0, self.decode_request(request)]

    def has_active_requests(self) -> bool:
        return bool(self.active)

    def has_capacity(self) -> bool:
        return len(self.active) < self.max_batch_size

    def step(self, prev_outputs):  # noqa: ANN001
        out = []
        for uid, st in list(self.active.items()):
            out.append(Output(uid, _TEXT[st[0] % len(_TEXT)], LitAPIStatus.OK))
            st[0] += 1
            if st[0] >= st[1]:
                out.append(Output(uid, "", LitAPIStatus.FINISH_STREAMING))
                del self.active[uid]
        return out

    def encode_response(self, output):  # noqa: ANN001
        return {"token": output}


def main() -> None:
    port, batch = int(sys.argv[1]), int(sys.argv[2])
    api = InstantBatchedAPI(max_batch_size=batch, stream=True,
                            loop=ContinuousBatchingLoop())
    server = ls.LitServer(api, accelerator="cpu", devices=1, workers_per_device=1,
                          timeout=False)
    server.run(host="127.0.0.1", port=port, log_level="warning", num_api_servers=1,
               generate_client_file=False)


if __name__ == "__main__":
    main()
