"""ONNX Runtime model: load, validate against the contract, pick the provider honestly, run.

``auto`` asks for CUDA only when it really works: ONNX Runtime silently falls back to CPU (and
prints alarming library errors) when the CUDA provider is listed but its libraries or a GPU are
missing, so every attempt checks ``get_providers()`` afterwards with ORT's own log turned down,
and the provider reported everywhere (log line, metric label, GetModelInfo) is the one in use.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort

from contract.files import sha256_file
from contract.model import (
    INPUT_C0,
    INPUT_FEATURES,
    INPUT_H0,
    INPUT_TOKENS,
    KIND_SEQUENCE,
    OUTPUT_CN,
    OUTPUT_HN,
    OUTPUT_LOGITS,
    OUTPUT_OUTPUTS,
    ContractError,
    ModelSpec,
    SequenceSpec,
    validate,
)
from contract.repository import MANIFEST, MODEL_FILE, ModelLocation, RepositoryError, resolve

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
# ORT severities: 0 verbose .. 3 error, 4 fatal. Probing CUDA logs "errors" that are not ours.
_ORT_QUIET = 4
_ORT_WARNING = 2


class ModelLoadError(RuntimeError):
    """The model cannot be found, loaded or validated, or the provider is unusable."""


def bundled_model_path() -> Path:
    """Where the bundled model lives (``server/model_repo/timemachine/1/model.onnx``)."""
    root = resources.files("server") / "model_repo" / "timemachine" / "1" / MODEL_FILE
    return Path(str(root))


def resolve_model(spec: str) -> ModelLocation:
    """Turn the ``--model`` setting into a file plus a name and version.

    The layout rules are :func:`contract.repository.resolve`'s; empty means the bundled model.
    Raises :class:`ModelLoadError` with a one-line reason.
    """
    path = Path(spec).expanduser() if spec else bundled_model_path()
    if not spec and not path.exists():
        raise ModelLoadError(
            f"the bundled model is missing ({path}); pass --model PATH or build it with lstm-export"
        )
    try:
        return resolve(path)
    except RepositoryError as e:
        raise ModelLoadError(str(e)) from None


def check_model_source(model: str, repository: str) -> None:
    """Fail early, in one line, when ``--model`` or ``--model-repository`` names nothing."""
    if model:
        resolve_model(model)
    elif repository and not Path(repository).expanduser().is_dir():
        raise ModelLoadError(f"model repository not found: {repository}")


# What ``lstm-export --batch`` writes in REPO/manifest.json (export/repository.py owns the format;
# the server may not import export/, and reads only the file names and hashes).
_MANIFEST_FORMAT = "lstm-serve-model-repo"


# The export report bundled beside a model (``lstm-export --report``): its ``fp32``/``int8``
# entries record each file's SHA-256.
EXPORT_REPORT = "metrics.json"


def recorded_sha256(path: Path) -> tuple[Path, str] | None:
    """The SHA-256 recorded for the model file at ``path``: by the repository's manifest, or
    else by the export report beside the file (``metrics.json``: its ``fp32``/``int8`` entries),
    or None when neither records it."""
    return _manifest_sha256(path) or _report_sha256(path)


def _report_sha256(path: Path) -> tuple[Path, str] | None:
    report = path.with_name(EXPORT_REPORT)
    if not report.is_file():
        return None
    try:
        data = json.loads(report.read_text(encoding="utf-8"))
        for variant in ("fp32", "int8"):
            entry = data.get(variant) or {}
            if Path(str(entry.get("path", ""))).name == path.name and entry.get("sha256"):
                return report, str(entry["sha256"])
    except (OSError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring %s: not a readable export report (%s)", report, e)
    return None


def _manifest_sha256(path: Path) -> tuple[Path, str] | None:
    """The SHA-256 that the repository's manifest records for the model file at ``path``.

    ``path`` is ``REPO/NAME/VERSION/FILE``; the manifest is ``REPO/manifest.json``, whose model
    entries list their files (and a failed entry's last good version's files) with their
    SHA-256. Returns ``(manifest path, hash)``, or None when there is no manifest or it does not
    list the file. A manifest that is not readable as one is ignored with a warning: the check
    is there to catch a damaged or swapped model file, not to refuse models outside a repository.
    """
    if len(path.parents) < 3:
        return None
    repo = path.parents[2]
    manifest = repo / MANIFEST
    if not manifest.is_file():
        return None
    rel = path.relative_to(repo).as_posix()
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("format") != _MANIFEST_FORMAT:
            raise ValueError(f"format is not {_MANIFEST_FORMAT!r}")
        for entry in data["models"].values():
            for version in (entry, entry.get("previous") or {}):
                for out in (version.get("outputs") or {}).values():
                    if out.get("path") == rel:
                        return manifest, str(out["sha256"])
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
        log.warning("ignoring %s: not a readable model repository manifest (%s)", manifest, e)
    return None


def _session_options(threads: int, severity: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.log_severity_level = severity
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return opts


class ModelRuntime:
    """One loaded model of either kind. :meth:`run` is safe to call from one thread at a time.

    ``run(tokens[T,B] int64, h[L,B,H] float32, c[L,B,H] float32) -> (logits[T,B,V], hn, cn)``
    for a ``token_lm`` model; for a ``sequence`` model the first input is ``features[T,B,F]``
    float32 and the first output ``outputs[T,B,O]``. The names are fixed once here, at load, so
    a call costs the same for either kind; :attr:`output_width` is V or O (the width of the
    state pool's last-output row).
    """

    def __init__(
        self,
        model: str = "",
        *,
        provider: str = "auto",
        intra_op_threads: int = 1,
        use_iobinding: bool | None = None,
        expected_sha256: str = "",
    ) -> None:
        self.location = resolve_model(model)
        # Stored sessions name the model they were computed with (name, version, checksum), so
        # a record is never used with a different model.
        self.checksum = sha256_file(self.location.path)
        recorded = recorded_sha256(self.location.path)
        if expected_sha256:
            recorded = (Path("--model-sha256"), expected_sha256.lower())
        if recorded is not None and recorded[1] != self.checksum:
            raise ModelLoadError(
                f"{self.location.path}: SHA-256 mismatch: expected {recorded[1]} (recorded in "
                f"{recorded[0]}), got {self.checksum}; the file is damaged or was replaced"
            )
        self.verified = recorded is not None
        if not self.verified:
            # A damaged file can still load and serve wrong outputs: say so, once, at load.
            log.warning(
                "%s: its SHA-256 (%s) is not verified: no manifest.json or export report "
                "records it; pin it with --model-sha256",
                self.location.path,
                self.checksum,
            )
        self.requested_provider = provider
        self.provider_note = ""
        self.session = self._create_session(provider, intra_op_threads)
        self.provider: str = self.session.get_providers()[0]
        try:
            self.spec: ModelSpec | SequenceSpec = validate(self.session, kind=None)
        except ContractError as e:
            raise ModelLoadError(f"{self.location.path}: {e}") from None
        self.kind: str = self.spec.kind
        if isinstance(self.spec, SequenceSpec):
            self.output_width = self.spec.num_outputs
            self._input = INPUT_FEATURES
            first_output = OUTPUT_OUTPUTS
        else:
            self.output_width = self.spec.vocab_size
            self._input = INPUT_TOKENS
            first_output = OUTPUT_LOGITS
        # IOBinding avoids host<->device copies of inputs/outputs on CUDA; on CPU plain run()
        # already wraps numpy buffers without copying, so it is only used there when asked
        # (tests cover the binding code on CPU).
        self.use_iobinding = (self.provider == CUDA) if use_iobinding is None else use_iobinding
        self._device = "cuda" if self.provider == CUDA else "cpu"
        self._outputs = [first_output, OUTPUT_HN, OUTPUT_CN]
        # InferenceSession.run re-validates the feed's names on every call (tens of
        # microseconds in Python); ours are fixed and were validated above, so call the native
        # session it wraps when this onnxruntime has one.
        self._bindings: dict[tuple[object, ...], tuple[ort.IOBinding, tuple[np.ndarray, ...]]] = {}
        native = getattr(self.session, "_sess", None)
        self._native_run = getattr(native, "run", None) if self.provider == CPU else None

    @property
    def name(self) -> str:
        return self.location.name

    @property
    def version(self) -> str:
        return self.location.version

    def _try(self, providers: list[str], threads: int, severity: int) -> ort.InferenceSession:
        try:
            return ort.InferenceSession(
                str(self.location.path),
                sess_options=_session_options(threads, severity),
                providers=providers,
            )
        except Exception as e:  # ORT raises several types for unreadable or invalid files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load {self.location.path}: {first}") from None

    def _create_session(self, provider: str, threads: int) -> ort.InferenceSession:
        if provider == "cpu":
            return self._try([CPU], threads, _ORT_WARNING)
        available = ort.get_available_providers()
        if provider == "cuda":
            if CUDA not in available:
                raise ModelLoadError(
                    "--provider cuda: this onnxruntime build has no CUDA provider "
                    f"(available: {', '.join(available)})"
                )
            sess = self._probe_cuda(threads)
            if sess is None:
                raise ModelLoadError(
                    "--provider cuda: the CUDA provider did not initialise (no GPU or CUDA/cuDNN "
                    "libraries missing); use --provider cpu or auto"
                )
            return sess
        if CUDA in available:
            sess = self._probe_cuda(threads)
            if sess is not None:
                return sess
            self.provider_note = "CUDA provider present but unusable here; using CPU"
        return self._try([CPU], threads, _ORT_WARNING)

    def _probe_cuda(self, threads: int) -> ort.InferenceSession | None:
        # ORT logs missing-library errors through its default logger while the session is being
        # created and then quietly uses CPU: silence it for the probe and judge by the result.
        ort.set_default_logger_severity(_ORT_QUIET)
        try:
            sess = self._try([CUDA, CPU], threads, _ORT_QUIET)
        finally:
            ort.set_default_logger_severity(_ORT_WARNING)
        if sess.get_providers()[0] != CUDA:
            return None
        return sess

    def smoke_test(self) -> None:
        """One real inference (two positions, two rows, zero state) before any request may reach
        the model: shapes as the contract says and every output finite. Raises ModelLoadError."""
        s = self.spec
        first = self._outputs[0]
        inputs: np.ndarray
        if isinstance(s, SequenceSpec):
            inputs = np.zeros((2, 2, s.num_features), np.float32)
            inputs[1] = 0.5
        else:
            inputs = np.zeros((2, 2), np.int64)
            inputs[1] = min(1, s.vocab_size - 1)
        h = np.zeros((s.num_layers, 2, s.hidden_size), np.float32)
        try:
            logits, hn, cn = self.run(inputs, h, h.copy())
        except Exception as e:  # ORT raises its own exception types
            raise ModelLoadError(f"{self.location.path}: the smoke inference failed: {e}") from None
        want = {first: (2, 2, self.output_width), "hn": h.shape, "cn": h.shape}
        for name, out in ((first, logits), ("hn", hn), ("cn", cn)):
            if tuple(out.shape) != want[name]:
                raise ModelLoadError(
                    f"{self.location.path}: the smoke inference gave {name} of shape "
                    f"{tuple(out.shape)}, expected {want[name]}"
                )
            if not np.isfinite(out).all():
                raise ModelLoadError(
                    f"{self.location.path}: the smoke inference gave non-finite {name}"
                )

    def run(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One forward pass. Inputs must be C-contiguous arrays: ``tokens`` int64 ``[T, B]`` (or
        a sequence model's features, float32 ``[T, B, F]``), ``h``/``c`` float32."""
        if self.use_iobinding:
            return self._run_bound(tokens, h, c)
        feed = {self._input: tokens, INPUT_H0: h, INPUT_C0: c}
        if self._native_run is not None:
            logits, hn, cn = self._native_run(self._outputs, feed, None)
        else:
            logits, hn, cn = self.session.run(self._outputs, feed)
        return logits, hn, cn

    def run_into(
        self,
        tokens: np.ndarray,
        h: np.ndarray,
        c: np.ndarray,
        logits: np.ndarray,
        hn: np.ndarray,
        cn: np.ndarray,
    ) -> None:
        """One forward pass whose outputs land in the given host buffers (IOBinding).

        Every array must be C-contiguous with the call's shapes and must stay alive and in
        place while this runtime may reuse its binding: the engine's running batch ping-pongs
        between two sets of buffers, so their two bindings are built once and reused, and the
        inputs are read from the buffers as they are at each call. On CUDA, ONNX Runtime copies
        the outputs from the device into these buffers.
        """
        arrays = (tokens, h, c, logits, hn, cn)
        key = (*(a.ctypes.data for a in arrays), h.shape, tokens.shape)
        entry = self._bindings.get(key)
        if entry is None:
            binding = self.session.io_binding()
            binding.bind_cpu_input(self._input, tokens)
            binding.bind_cpu_input(INPUT_H0, h)
            binding.bind_cpu_input(INPUT_C0, c)
            for name, arr in zip(self._outputs, (logits, hn, cn), strict=True):
                binding.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            if len(self._bindings) >= 4:
                self._bindings.clear()  # membership changed: the old buffers are gone
            # The arrays ride along so their memory cannot be freed while bound.
            entry = self._bindings[key] = (binding, arrays)
        self.session.run_with_iobinding(entry[0])

    def _run_bound(
        self, tokens: np.ndarray, h: np.ndarray, c: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self._input, tokens)
        binding.bind_cpu_input(INPUT_H0, h)
        binding.bind_cpu_input(INPUT_C0, c)
        for name in self._outputs:
            # ORT allocates each output on the device; the one copy back to the host per output
            # is all the state pool needs.
            binding.bind_output(name, self._device)
        self.session.run_with_iobinding(binding)
        logits, hn, cn = binding.copy_outputs_to_cpu()
        return logits, hn, cn

    def describe(self) -> str:
        note = f" ({self.provider_note})" if self.provider_note else ""
        s = self.spec
        sizes = (
            f"{KIND_SEQUENCE} F={s.num_features} O={s.num_outputs}"
            if isinstance(s, SequenceSpec)
            else f"V={s.vocab_size}"
        )
        return (
            f"model {self.name} version {self.version} ({self.location.path}): "
            f"L={s.num_layers} H={s.hidden_size} {sizes}, provider {self.provider}{note}"
        )
