"""The embedding sizes of a model, shared by the torch model and the ONNX Runtime one (no torch here)."""

from __future__ import annotations

from ..errors import UniretError


class EmbeddingSizes:
    """The embedding sizes of a model with a ``config`` (``dim``, ``nested_dims``): shared by the torch
    model and the ONNX Runtime one (this module loads no torch)."""

    @property
    def dims(self) -> list[int]:
        """Embedding sizes this model serves: the nested prefixes, else the full size."""
        return list(self.config.nested_dims or [self.config.dim])

    def check_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.config.dim
        if int(dim) not in self.dims:
            raise UniretError(f"dim {dim} is not an embedding size of this model; choose one of {self.dims}")
        return int(dim)
