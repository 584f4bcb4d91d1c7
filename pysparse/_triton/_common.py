"""What the Triton launchers share: whether kernels run under the interpreter, and the kernels'
integer code for each activation name."""
import os

from ..activations import NAMES

# Programs run one after another under TRITON_INTERPRET=1 (how CI runs the kernels on CPU tensors):
# the launchers then use one large tile instead of autotuning.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The codes of kernels/_tiles.py's `activation`.
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3, "gelu_tanh": 4}
assert set(ACT_CODES) == set(NAMES), "kernels/_tiles.py must encode every activation"
