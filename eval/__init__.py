"""uniret.eval: UnED metrics (:mod:`.metrics`), protocols on computed embeddings (:mod:`.protocol`),
embedding for evaluation with a cache (:mod:`.embeddings`), ``evaluate`` from a model directory and a
collection (:mod:`.run`), evaluation through a built index (:mod:`.indexed`) and reports
(:mod:`.report`)."""

from .metrics import retrieval_metrics
from .protocol import evaluate_embeddings
from .run import evaluate

__all__ = ["evaluate", "evaluate_embeddings", "retrieval_metrics"]
