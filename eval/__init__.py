"""uniret.eval: UnED metrics (:mod:`.metrics`), protocols on computed embeddings (:mod:`.protocol`),
``evaluate`` from a model directory and a collection (:mod:`.run`), reports (:mod:`.report`) and the
one-command demo (:mod:`.demo`)."""

from .metrics import retrieval_metrics
from .protocol import evaluate, evaluate_embeddings

__all__ = ["evaluate", "evaluate_embeddings", "retrieval_metrics"]
