"""The Backend interface a model author subclasses, and what it exchanges with the server:
the knobs it samples with (:class:`Sampling`), the sinks it streams into and the
:class:`Completion` it returns."""
from tep.backend.interface import Backend
from tep.backend.results import Completion, TokenLogprob
from tep.backend.sampling import Sampling
from tep.backend.sinks import ChatStreamSink, StreamSink, current_cancel
from tep.backend.stops import StopMatcher

__all__ = ["Backend", "Completion", "TokenLogprob", "Sampling", "StreamSink",
           "ChatStreamSink", "StopMatcher", "current_cancel"]
