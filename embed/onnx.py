"""The model as an ONNX graph: export, verification against torch, and running it with ONNX Runtime.

``uniret model export MODEL --format onnx --out m.onnx`` writes one graph, input ``image`` (N, 3, H,
W) float32 with a dynamic batch, output ``embedding`` (N, dim) float32, L2-normalised: exactly
``UniversalEmbedder.forward``. The graph carries its model in its metadata (``uniret``: the model's
config with ``config_hash``, preprocessing and ``nested_dims``; a nested prefix is the first d
numbers re-normalised, as in torch), and ``m.onnx.json`` beside it records the same for tools that
do not read ONNX metadata. Every export is checked against the torch model before it is written:
cosine > :data:`MIN_COSINE` on real photos (scikit-image's sample images when installed) and noise.

A model directory may keep its graph as ``model.onnx`` (``uniret index build`` exports one into the
index's model copy), so that a server running ONNX never loads the torch weights; :func:`model_graph`
reads it, or exports one in memory when it is missing or stale.

:class:`OnnxEmbedder` runs a graph: CPU, or on a GPU ONNX Runtime's TensorRT/CUDA providers where
present; preprocessing is :class:`~uniret.embed.imageprep.ImagePrep` (Pillow + numpy, no torch).
``onnxruntime`` (and ``onnx``, for writing the metadata) are the optional extra ``uniret[onnx]``.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UniretError, UsageError
from .imageprep import ImagePrep
from .sizes import EmbeddingSizes

logger = logging.getLogger("uniret")

FORMAT = "uniret-onnx/1"
#: The graph's name inside a model directory (and so inside an index's model copy).
GRAPH_NAME = "model.onnx"
METADATA_KEY = "uniret"
OPSET = 17
#: The least cosine between the torch model's and the graph's embeddings an export must reach.
MIN_COSINE = 0.9999
RUNTIMES = ("torch", "onnx", "auto")
INSTALL_HINT = "install ONNX Runtime (pip install 'uniret[onnx]')"


def have_onnxruntime() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UniretError(f"the ONNX runtime needs the {module} package; {INSTALL_HINT}") from None


# -- export ------------------------------------------------------------------------------------------
def graph_metadata(model) -> dict:
    """What the graph records about its model: the model config (with its hash) and the tensor names."""
    config = model.config.to_json()
    config["config_hash"] = model.config_hash()
    return {"format": FORMAT, "config": config, "input": "image", "output": "embedding"}


def export_graph(model) -> bytes:
    """The ONNX graph (bytes) of a UniversalEmbedder, dynamic batch, with :func:`graph_metadata`."""
    import torch

    onnx = _need("onnx")
    if model.device.type != "cpu":  # export a CPU copy; the caller's model stays where it is
        import copy

        model = copy.deepcopy(model).to("cpu")
    model = model.eval()
    size = model.config.preprocess["input_size"]
    buffer = io.BytesIO()
    try:
        # Gradients stay enabled while tracing: under no_grad, nn.MultiheadAttention (open_clip) takes a
        # fused fast path that has no ONNX operator.
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")  # the exporter's tracer warnings are about Python control flow it folds
            torch.onnx.export(model, (torch.zeros(2, *size),), buffer, input_names=["image"],
                              output_names=["embedding"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
    except Exception as exc:  # noqa: BLE001 - an operator the exporter does not know, for instance
        raise UniretError(f"{model.config.backbone} does not export to ONNX ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:200]}); use --runtime torch") from None
    proto = onnx.load_from_string(buffer.getvalue())
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(graph_metadata(model), sort_keys=True)
    proto.producer_name = "uniret"
    return proto.SerializeToString()


def sample_images() -> list:
    """Real photos to check an export on: scikit-image's sample images (CC0 / public domain) when
    installed, else a few drawn test cards (gradients and shapes)."""
    from PIL import Image, ImageDraw

    images = []
    try:
        import skimage

        folder = Path(skimage.__file__).parent / "data"
        for name in ("astronaut.png", "coffee.png", "chelsea.png", "camera.png", "rocket.jpg", "motorcycle_left.png"):
            if (folder / name).is_file():
                with Image.open(folder / name) as im:
                    images.append(im.convert("RGB"))
    except ImportError:
        pass
    if not images:
        for seed in range(4):
            rng = np.random.default_rng(seed)
            ramp = np.linspace(0, 255, 160, dtype=np.float32)
            base = np.stack([np.add.outer(ramp, ramp[::-1]) / 2, np.tile(ramp, (160, 1)),
                             np.tile(ramp[:, None], (1, 160))], axis=-1)
            im = Image.fromarray(np.clip(base * rng.uniform(0.5, 1, 3), 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(im)
            for _ in range(6):
                x, y = rng.integers(0, 120, 2)
                draw.ellipse((int(x), int(y), int(x) + 40, int(y) + 30), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
            images.append(im)
    return images


def check_parity(model, embedder: OnnxEmbedder, images=None) -> float:
    """The least cosine between the torch model's and the graph's embeddings of ``images`` (default:
    :func:`sample_images`) and two noise images, every nested size included; an error under
    :data:`MIN_COSINE`."""
    import torch

    images = sample_images() if images is None else images
    batch = embedder.preprocess(images)
    noise = np.random.default_rng(0).standard_normal((2, *batch.shape[1:])).astype(np.float32)
    batch = np.concatenate([batch, noise])
    worst = 1.0
    with torch.inference_mode():
        was_training = model.training
        reference = model.eval()(torch.from_numpy(batch).to(model.device)).float().cpu().numpy()
        model.train(was_training)
    ours = embedder.run(batch)
    for d in model.dims:
        a, b = _prefix(reference, d), _prefix(ours, d)
        worst = min(worst, float((a * b).sum(axis=1).min()))
    if not worst > MIN_COSINE:
        raise UniretError(f"the ONNX graph of {model.config.backbone} differs from the torch model (cosine "
                          f"{worst:.6f} < {MIN_COSINE}); use --runtime torch")
    return worst


def _prefix(z: np.ndarray, d: int) -> np.ndarray:
    if d == z.shape[1]:
        return z
    part = z[:, :d]
    return part / np.maximum(np.linalg.norm(part, axis=1, keepdims=True), 1e-12)


def is_own_export(path: Path) -> bool:
    """A graph uniret exported (its sidecar ``<name>.json`` has the ONNX export format)."""
    from ..guards import file_has_format

    return file_has_format(sidecar_path(path), FORMAT.split("/")[0])


def sidecar_path(graph: Path) -> Path:
    return Path(f"{graph}.json")


def export_model(model_path, out, overwrite: bool = False) -> dict:
    """``uniret model export``: write ``out`` (the graph) and ``out.json`` (what it is and how to
    preprocess its input) after checking the graph against the torch model; returns the sidecar."""
    from ..guards import check_output_file, output_lock
    from ..utils import atomic_write_bytes, atomic_write_json
    from .model import load_model, resolve_model_dir

    out = Path(out)
    model_dir = resolve_model_dir(model_path)
    guard = {"what": "exported ONNX graph", "is_own": is_own_export, "inputs": [model_dir], "overwrite": overwrite}
    check_output_file(out, **guard, suffixes=(".onnx",))
    side = sidecar_path(out)
    if (side.exists() or side.is_symlink()) and not is_own_export(out):
        raise UniretError(f"{side} exists and is not the record of a uniret ONNX export; uniret never replaces "
                          "what it did not make: choose another --out")
    _need("onnxruntime")
    model = load_model(model_dir)
    graph = export_graph(model)
    cosine = check_parity(model, OnnxEmbedder(graph))
    meta = graph_metadata(model)
    record = {"format": FORMAT, "graph": out.name, "model": str(model_dir.resolve()),
              "config_hash": meta["config"]["config_hash"], "backbone": model.config.backbone,
              "dim": model.config.dim, "nested_dims": model.config.nested_dims,
              "input": {"name": "image", "shape": ["batch", *model.config.preprocess["input_size"]],
                        "dtype": "float32"},
              "output": {"name": "embedding", "shape": ["batch", model.config.dim], "dtype": "float32",
                         "normalised": True},
              "preprocess": model.config.preprocess, "opset": OPSET, "parity_cosine": round(cosine, 7)}
    with output_lock(out, "exported ONNX graph"):
        check_output_file(out, **guard, suffixes=(".onnx",))  # again under the lock
        atomic_write_json(side, record)  # the record first: a graph is only ever beside its record
        atomic_write_bytes(out, graph)
    return record


def save_graph(model, model_dir: Path) -> bool:
    """Write ``model_dir/model.onnx`` for ``model`` (an index's model copy); False, with a log line,
    when the model does not export or ONNX is not installed (the copy then serves with torch)."""
    from ..utils import atomic_write_bytes

    try:
        graph = export_graph(model)
        check_parity(model, OnnxEmbedder(graph))
    except UniretError as exc:
        logger.info("no ONNX graph in %s (%s)", model_dir, exc)
        return False
    atomic_write_bytes(Path(model_dir) / GRAPH_NAME, graph)
    return True


# -- running ---------------------------------------------------------------------------------------
def providers_for(device: str) -> list:
    """ONNX Runtime execution providers for a resolved device (``cpu`` or ``cuda:N``)."""
    ort = _need("onnxruntime")
    if not device.startswith("cuda"):
        return ["CPUExecutionProvider"]
    gpu = int(device.partition(":")[2] or 0)
    available = set(ort.get_available_providers())
    wanted = [(name, {"device_id": gpu}) for name in ("TensorrtExecutionProvider", "CUDAExecutionProvider")
              if name in available]
    if not wanted:
        raise UniretError(f"--runtime onnx on {device}: this onnxruntime has no CUDA or TensorRT provider; "
                          "install onnxruntime-gpu, or use --runtime torch")
    return [*wanted, "CPUExecutionProvider"]


def gpu_providers_present() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return bool({"TensorrtExecutionProvider", "CUDAExecutionProvider"} & set(ort.get_available_providers()))


@dataclass
class GraphConfig:
    """The model config a graph records, read without torch (``embed.model.ModelConfig`` imports it):
    the fields running the graph needs."""

    backbone: str
    dim: int
    nested_dims: list[int] | None
    preprocess: dict

    @staticmethod
    def from_metadata(config: dict) -> GraphConfig:
        dim, nested, pre = config.get("dim"), config.get("nested_dims"), config.get("preprocess")
        ok = (isinstance(dim, int) and dim > 0 and (nested is None or (isinstance(nested, list) and all(
            isinstance(d, int) and 0 < d <= dim for d in nested))) and isinstance(pre, dict)
            and isinstance(pre.get("input_size"), list) and len(pre["input_size"]) == 3
            and all(isinstance(v, (int, float)) for v in [*pre["input_size"], *pre.get("mean", []), *pre.get("std", [])])
            and len(pre.get("mean", [])) == 3 and len(pre.get("std", [])) == 3 and min(pre["std"]) > 0)
        if not ok:
            raise UniretError("the ONNX graph's uniret metadata is damaged (dim, nested_dims or preprocess); re-export it")
        return GraphConfig(str(config.get("backbone")), dim, nested, pre)


class OnnxEmbedder(EmbeddingSizes):
    """An exported graph under ONNX Runtime: ``encode(images | batch, dim) -> (N, d)`` float32 numpy,
    the same contract as ``UniversalEmbedder.encode`` (see the module docstring)."""

    runtime = "onnx"

    def __init__(self, graph: bytes | str | Path, device: str = "cpu", threads: int | None = None):
        ort = _need("onnxruntime")
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings about unused initialisers would reach stderr
        # No busy-waiting between runs: spinning threads take the CPU from request parsing, decoding and
        # search (a server's other work) and from whatever else shares the machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if threads:
            options.intra_op_num_threads = int(threads)
        source = str(graph) if isinstance(graph, (str, Path)) else graph
        self.graph = source  # what other processes load the same graph from (--engine ray ships its bytes)
        try:
            self.session = ort.InferenceSession(source, options, providers=providers_for(device))
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own classes for a damaged file
            raise UniretError(f"cannot load the ONNX graph{' ' + str(graph) if isinstance(graph, (str, Path)) else ''} "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:160]}); re-export it") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        try:
            info = json.loads(meta) if meta else None
        except ValueError:
            info = None
        if not isinstance(info, dict) or info.get("format") != FORMAT or not isinstance(info.get("config"), dict):
            raise UniretError("the ONNX graph has no uniret metadata: export it with `uniret model export`")
        self.config = GraphConfig.from_metadata(info["config"])
        self.config_hash_value = str(info["config"].get("config_hash"))
        self.device = device
        self.prep = ImagePrep(self.config.preprocess) if ImagePrep.supports(self.config.preprocess) else None

    def config_hash(self) -> str:
        return self.config_hash_value

    def preprocess(self, images) -> np.ndarray:
        """PIL images -> the (N, 3, H, W) float32 input batch."""
        if self.prep is not None:
            return self.prep(list(images))
        from .preprocess import eval_transform  # a crop mode ImagePrep does not reproduce: torch's

        transform = eval_transform(self.config.preprocess)
        return np.stack([transform(im).numpy() for im in images])

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The graph on one (N, 3, H, W) float32 batch -> (N, dim)."""
        return self.session.run(None, {"image": np.ascontiguousarray(batch, dtype=np.float32)})[0]

    def encode(self, images, dim: int | None = None, batch_size: int = 64) -> np.ndarray:
        d = self.check_dim(dim)
        if isinstance(images, np.ndarray):
            batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
        else:
            images = list(images)
            batches = [self.preprocess(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
        if not batches:
            return np.zeros((0, d), dtype=np.float32)
        z = np.concatenate([self.run(b) for b in batches])
        return _prefix(z, d)


def stored_embedder(model_dir: Path, device: str = "cpu", threads: int | None = None) -> OnnxEmbedder | None:
    """The model directory's own ``model.onnx`` under ONNX Runtime, when it records the directory's
    config hash (None when there is none; a stale one is reported and ignored)."""
    from ..utils import read_json

    graph = Path(model_dir) / GRAPH_NAME
    if not graph.is_file():
        return None
    want = (read_json(Path(model_dir) / "config.json") or {}).get("config_hash")  # model.CONFIG_NAME (torch-free here)
    embedder = OnnxEmbedder(graph, device=device, threads=threads)
    if want and embedder.config_hash() == want:
        return embedder
    logger.warning("%s was exported from another model than %s; ignoring it", graph, Path(model_dir) / "config.json")
    return None


def model_graph(model_dir: Path, torch_model=None) -> bytes | Path:
    """The graph of the model directory ``model_dir``: its ``model.onnx`` when that records the
    directory's config hash, else one exported (and checked) now from the torch model."""
    if stored_embedder(model_dir) is not None:
        return Path(model_dir) / GRAPH_NAME
    from .model import load_model

    model = torch_model if torch_model is not None else load_model(model_dir)
    data = export_graph(model)
    check_parity(model, OnnxEmbedder(data))
    return data


def resolve_runtime(runtime: str | None, device: str) -> str:
    """``torch`` or ``onnx`` for ``--runtime torch|onnx|auto`` on a resolved device. auto: ONNX
    Runtime on a CPU when it is installed; on a GPU when it has the TensorRT provider (torch's
    autocast path is faster than ONNX Runtime's CUDA provider in fp32). Whether the model exports is
    settled where the graph is loaded (:func:`load_embedder` falls back to torch for auto)."""
    name = "auto" if runtime is None else str(runtime).strip().lower()
    if name not in RUNTIMES:
        raise UsageError(f"--runtime {runtime!r}: use torch, onnx or auto")
    if name != "auto":
        if name == "onnx":
            _need("onnxruntime")
        return name
    if not have_onnxruntime():
        return "torch"
    if device.startswith("cuda"):
        import onnxruntime as ort

        return "onnx" if "TensorrtExecutionProvider" in ort.get_available_providers() else "torch"
    return "onnx"


def load_embedder(model_dir: Path, runtime: str, device: str, auto: bool = False, export_missing: bool = True,
                  threads: int | None = None):
    """The embedder of ``model_dir`` for a resolved runtime: a torch ``UniversalEmbedder`` or an
    :class:`OnnxEmbedder` of the directory's stored graph, else (``export_missing``) of a graph
    exported now. With ``auto``, a model without a usable graph runs with torch instead. ``threads``:
    ONNX Runtime's threads per forward pass (None: one per core)."""
    if runtime == "onnx":
        try:
            embedder = stored_embedder(model_dir, device, threads)
            if embedder is not None:
                return embedder
            if export_missing:
                return OnnxEmbedder(model_graph(model_dir), device=device, threads=threads)
            logger.debug("runtime auto: %s keeps no ONNX graph (uniret index build stores one); using torch", model_dir)
        except UniretError as exc:
            if not auto:
                raise
            logger.debug("runtime auto: %s; using torch", exc)
    from .model import load_model  # torch: only when torch runs the model

    return load_model(model_dir, device=device)
