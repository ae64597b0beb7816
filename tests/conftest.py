import os
import tempfile

# A fresh Inductor cache per test session: a cache hit skips the post-grad passes (and so
# their dumps), which would make results depend on what ran before on this machine.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ascend_compile_inductor_"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
