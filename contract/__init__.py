"""The torch-free contract at the bottom of lstm-serve: what training and export write with and
what the server reads with.

* :mod:`contract.model`: ONNX input/output names, metadata keys, :class:`~contract.model.ModelSpec`,
  :func:`~contract.model.validate`, and the state-size formula.
* :mod:`contract.text`: text rules, vocabulary, corpus reading, the held-out split and the
  evaluation geometry (how a token stream is cut into rows for perplexity).
* :mod:`contract.repository`: the model repository layout ``NAME/VERSION/model.onnx``.
* :mod:`contract.files`: atomic file writes and checksums.
* :mod:`contract.args`: argparse value readers shared by the command-line tools.

Imports nothing from this project and neither torch nor onnx (``validate`` loads
onnxruntime lazily, only when given a path or bytes). Layers above it are enforced by
import-linter (``[tool.importlinter]`` in pyproject.toml).
"""
