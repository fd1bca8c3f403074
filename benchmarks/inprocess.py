"""Sections 1 and 2: decode steps (T=1) in process, the physical limit and the naive alternative.

Section 1 calls ONNX Runtime directly with the server's session options (intra-op threads from
the server's settings, one inter-op thread, sequential execution), feeding each call's ``hn, cn``
back as the next call's state, exactly what one scheduler iteration of the server does minus
everything around it. Section 2 runs PyTorch eager ``nn.LSTM`` (our ``CharLSTM`` with the torch
cell: one-hot input, ``nn.LSTM``, ``nn.Linear``, the same computation as the ONNX graph) with
torch's thread count set to the same number.

With ``iobinding=True`` (and ``provider="cuda"``) the state stays on the device between calls:
inputs are bound once as ``OrtValue``s and the outputs are written into two preallocated state
buffers that swap roles every step, so no host copy happens per step except the token ids.
The same code path runs on CPU, which is how it is exercised without a GPU.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .common import ModelUnderTest, SectionSkipped, percentiles_ms


def ort_session(path: str, threads: int, provider: str = "cpu") -> Any:
    """An ORT session configured like the server's (see ``server/runtime.py``)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    providers = ["CPUExecutionProvider"]
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SectionSkipped("CUDA provider not in this onnxruntime build")
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    sess = ort.InferenceSession(path, sess_options=opts, providers=providers)
    if provider == "cuda" and sess.get_providers()[0] != "CUDAExecutionProvider":
        raise SectionSkipped("CUDA provider did not initialise (no GPU or CUDA libraries)")
    return sess


def time_loop(step: Any, min_seconds: float, min_calls: int, warmup: int) -> np.ndarray:
    """Nanoseconds per ``step()``: ``warmup`` untimed calls, then at least ``min_calls`` and
    ``min_seconds``."""
    for _ in range(warmup):
        step()
    samples: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(min_seconds * 1e9)
    while len(samples) < min_calls or clock() < end:
        t0 = clock()
        step()
        samples.append(clock() - t0)
    return np.asarray(samples, dtype=np.int64)


def _row(batch: int, samples: np.ndarray) -> dict[str, Any]:
    total_s = float(samples.sum()) / 1e9
    row: dict[str, Any] = {"batch": batch, "calls": int(samples.size)}
    row["tokens_per_s"] = batch * samples.size / total_s if total_s > 0 else None
    row.update(percentiles_ms(samples))
    return row


def ort_decode(
    model: ModelUnderTest,
    batches: Sequence[int],
    threads: int,
    seconds: float,
    *,
    provider: str = "cpu",
    iobinding: bool = False,
    path: str | None = None,
) -> dict[str, Any]:
    """Section 1: ``tokens/s`` and per-call latency of T=1 decode steps at each batch size."""
    sess = ort_session(path or model.path, threads, provider)
    rows = []
    for B in batches:
        step = decode_stepper(sess, model, B, provider=provider, iobinding=iobinding)
        rows.append(_row(B, time_loop(step, seconds, 20, 10)))
    return {
        "provider": sess.get_providers()[0],
        "iobinding": iobinding,
        "intra_op_threads": threads,
        "inter_op_threads": 1,
        "rows": rows,
    }


def decode_stepper(
    sess: Any, model: ModelUnderTest, batch: int, *, provider: str = "cpu", iobinding: bool = False
) -> Callable[[], None]:
    """One T=1 decode call at ``batch`` rows (random token ids), each call's ``hn, cn`` fed back
    as the next call's state: section 1's loop body, also the baseline of section 9."""
    L, H, V = model.num_layers, model.hidden_size, model.vocab_size
    tokens = np.random.default_rng().integers(0, V, size=(1, batch), dtype=np.int64)
    if iobinding:
        step, _ = bound_stepper(sess, tokens, L, H, "cuda" if provider == "cuda" else "cpu")
        return step
    feeds = {
        "tokens": tokens,
        "h0": np.zeros((L, batch, H), np.float32),
        "c0": np.zeros((L, batch, H), np.float32),
    }

    def plain_step() -> None:
        _, feeds["h0"], feeds["c0"] = sess.run(None, feeds)

    return plain_step


def bound_stepper(
    sess: Any, tokens: np.ndarray, L: int, H: int, device: str
) -> tuple[Callable[[], None], Callable[[], tuple[np.ndarray, np.ndarray]]]:
    """``(step, state)``: one decode step through IOBinding, and the current ``(h, c)`` on host.

    State starts at zeros and stays on ``device`` between steps (two buffers per tensor, swapped
    every step); ``state()`` copies it back, for checking, not for timing.
    """
    import onnxruntime as ort

    B = tokens.shape[1]
    V = sess.get_outputs()[0].shape[-1]
    dev_id = 0
    tok = ort.OrtValue.ortvalue_from_numpy(tokens, device, dev_id)
    bufs = [
        [
            ort.OrtValue.ortvalue_from_numpy(np.zeros((L, B, H), np.float32), device, dev_id)
            for _ in range(2)
        ]
        for _ in range(2)
    ]
    logits = ort.OrtValue.ortvalue_from_shape_and_type([1, B, V], np.float32, device, dev_id)
    binding = sess.io_binding()
    binding.bind_ortvalue_input("tokens", tok)
    binding.bind_ortvalue_output("logits", logits)
    flip = [0]

    def step() -> None:
        i = flip[0]
        binding.bind_ortvalue_input("h0", bufs[0][i])
        binding.bind_ortvalue_input("c0", bufs[1][i])
        binding.bind_ortvalue_output("hn", bufs[0][1 - i])
        binding.bind_ortvalue_output("cn", bufs[1][1 - i])
        sess.run_with_iobinding(binding)
        flip[0] = 1 - i

    def state() -> tuple[np.ndarray, np.ndarray]:
        i = flip[0]
        return bufs[0][i].numpy(), bufs[1][i].numpy()

    return step, state


def torch_decode(
    model: ModelUnderTest, batches: Sequence[int], threads: int, seconds: float
) -> dict[str, Any]:
    """Section 2: PyTorch eager ``nn.LSTM`` (+ one-hot input and projection) at the same shapes."""
    try:
        import torch

        from training.model import CharLSTM, ModelConfig
    except ImportError as e:
        raise SectionSkipped(f"torch or training/ not importable: {e}") from None
    torch.set_num_threads(threads)
    net = CharLSTM(
        ModelConfig(
            vocab_size=model.vocab_size,
            hidden_size=model.hidden_size,
            num_layers=model.num_layers,
            cell="torch",
            input_mode="embedding" if model.input_mode == "embedding" else "onehot",
            embedding_dim=model.embedding_dim,
        )
    ).eval()

    def sweep() -> list[dict[str, Any]]:
        rows = []
        with torch.inference_mode():
            for B in batches:
                tokens = torch.randint(0, model.vocab_size, (1, B))
                state = [net.begin_state(B)]

                def step(tokens: torch.Tensor = tokens, state: list[Any] = state) -> None:
                    _, state[0] = net(tokens, state[0])

                rows.append(_row(B, time_loop(step, seconds, 20, 10)))
        return rows

    rows = sweep()
    # On CPU, nn.LSTM goes through oneDNN by default, which builds an RNN primitive per call: a
    # large fixed cost at small batches. With it off, PyTorch's native kernels run; recorded too,
    # so the comparison is also made against the faster of the two.
    with warnings.catch_warnings():
        # flags() re-applies every oneDNN setting and warns about TF32 on Intel GPUs: not ours.
        warnings.simplefilter("ignore", UserWarning)
        with torch.backends.mkldnn.flags(enabled=False):
            rows_native = sweep()
    return {
        "torch_threads": torch.get_num_threads(),
        "onednn_available": bool(torch.backends.mkldnn.is_available()),
        "rows": rows,
        "rows_onednn_off": rows_native,
    }


def paired_b1(model: ModelUnderTest, threads: int, seconds: float, rounds: int) -> dict[str, Any]:
    """ORT vs PyTorch at B=1, alternated round by round (the p4 ratio).

    Each round times ORT, PyTorch eager (oneDNN on, the default) and PyTorch with oneDNN off
    back to back for ``seconds`` each; the ratio is taken within each round and the median
    round reported, so load that comes and goes on a shared machine hits both sides alike.
    """
    try:
        import torch

        from training.model import CharLSTM, ModelConfig
    except ImportError as e:
        raise SectionSkipped(f"torch or training/ not importable: {e}") from None
    torch.set_num_threads(threads)
    sess = ort_session(model.path, threads)
    L, H, V = model.num_layers, model.hidden_size, model.vocab_size
    feeds = {
        "tokens": np.random.default_rng().integers(0, V, size=(1, 1), dtype=np.int64),
        "h0": np.zeros((L, 1, H), np.float32),
        "c0": np.zeros((L, 1, H), np.float32),
    }

    def ort_step() -> None:
        _, feeds["h0"], feeds["c0"] = sess.run(None, feeds)

    net = CharLSTM(
        ModelConfig(
            vocab_size=V,
            hidden_size=H,
            num_layers=L,
            cell="torch",
            input_mode="embedding" if model.input_mode == "embedding" else "onehot",
            embedding_dim=model.embedding_dim,
        )
    ).eval()
    tok = torch.randint(0, V, (1, 1))
    state = [net.begin_state(1)]

    def torch_step() -> None:
        _, state[0] = net(tok, state[0])

    def tps(samples: np.ndarray) -> float:
        return float(samples.size / (samples.sum() / 1e9))

    per_round = []
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(rounds):
            o = tps(time_loop(ort_step, seconds, 20, 10))
            t = tps(time_loop(torch_step, seconds, 20, 10))
            with torch.backends.mkldnn.flags(enabled=False):
                n = tps(time_loop(torch_step, seconds, 20, 10))
            per_round.append({"ort": o, "torch": t, "torch_onednn_off": n})
    return {
        "rounds": per_round,
        "ort_vs_torch": float(np.median([r["ort"] / r["torch"] for r in per_round])),
        "ort_vs_torch_onednn_off": float(
            np.median([r["ort"] / r["torch_onednn_off"] for r in per_round])
        ),
    }
