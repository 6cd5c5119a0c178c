"""minirlhf: RLHF from scratch on NumPy and CuPy, every gradient our own and checked.

    import minirlhf as mr
    x = mr.tensor([[1.0, -2.0]], requires_grad=True)
    y = (x * x).sum(); y.backward(); x.grad          # array([[ 2., -4.]], dtype=float32)
"""

from .backend import DeviceError, cupy_available
from .kernels import get_num_threads, set_num_threads
from .gradcheck import GradcheckError, gradcheck
from .ops import concatenate, matmul, stack, where
from .tensor import ShapeError, Tensor, is_grad_enabled, no_grad, tensor

__version__ = "0.1.0"

__all__ = [
    "Tensor", "tensor", "no_grad", "is_grad_enabled", "gradcheck", "GradcheckError",
    "ShapeError", "DeviceError", "cupy_available", "concatenate", "stack", "where", "matmul",
    "get_num_threads", "set_num_threads",
]
