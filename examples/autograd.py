"""The autograd engine in five minutes: build a graph, run backward, check it against finite differences.

    python examples/autograd.py

Every op records how it was computed; `backward()` applies the chain rule from the output back to the
leaves. `mr.gradcheck` compares each analytic gradient with a float64 central difference
(f(x+ε) - f(x-ε)) / 2ε under a random cotangent, and raises `mr.GradcheckError` if they disagree.
"""

import argparse

import numpy as np

import minirlhf as mr
import minirlhf.functional as F
from minirlhf.tensor import Function


def main(smoke=False):
    rng = np.random.default_rng(0)

    # 1. a tiny two-layer network and its gradients, PyTorch-style
    x = mr.tensor(rng.standard_normal((4, 3)))                       # (B, in)
    w1 = mr.tensor(rng.standard_normal((3, 5)), requires_grad=True)  # (in, hidden)
    w2 = mr.tensor(rng.standard_normal((5, 2)), requires_grad=True)  # (hidden, classes)
    targets = np.array([0, 1, 1, 0])
    loss = F.cross_entropy((x @ w1).relu() @ w2, targets)
    loss.backward()
    print(f"loss {loss.item():.4f}; dL/dw1 has shape {w1.grad.shape}, dL/dw2 {w2.grad.shape}")

    # 2. check those gradients numerically (float64 central differences)
    mr.gradcheck(lambda w1, w2: F.cross_entropy((x @ w1).relu() @ w2, targets), [w1, w2])
    print("gradcheck: the analytic gradients of the network match finite differences")

    # 3. the fused, numerically stable ops survive logits of 1e4 and log-sigmoid of -1e3
    big = mr.tensor(np.array([[1e4, 0.0, -1e4]]), requires_grad=True)
    F.log_softmax(big).sum().backward()
    print("log_softmax of [1e4, 0, -1e4]:", F.log_softmax(big).numpy().round(3),
          "gradient finite:", bool(np.isfinite(big.grad).all()))
    print("logsigmoid(-1e3) =", F.logsigmoid(mr.tensor(np.array(-1e3))).item())

    # 4. a wrong backward is caught, with the worst element and both values
    class BadSquare(Function):
        def forward(self, a):
            self.a = a
            return a * a

        def backward(self, gy):
            """y = a² -> ga = 2a·gy. We plant a bug: a·gy."""
            return (gy * self.a,)

    try:
        mr.gradcheck(lambda a: BadSquare()(a), [rng.standard_normal(3)])
    except mr.GradcheckError as e:
        print("gradcheck caught the planted bug:\n" + str(e))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="(no effect: this example is fast)")
    main(parser.parse_args().smoke)
