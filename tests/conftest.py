"""Session-wide test settings.

Tiny layers run ~10x faster on one intra-op thread on a shared 2-core machine (idle OpenMP threads
spin and crowd each other out), so torch runs single-threaded and OpenMP waits passively. Timing code
under test sets onnxruntime's threads explicitly and is unaffected.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch's OpenMP runtime starts

import torch  # noqa: E402

torch.set_num_threads(1)
