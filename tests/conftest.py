import os
import tempfile

# A fresh Inductor cache per test session: a cache hit skips the post-grad passes (and so
# their dumps), which would make results depend on what ran before on this machine.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ascend_compile_inductor_"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Inductor picks its CPU vector ISA from /proc/cpuinfo's flags; without this it also proves each one by
# building a test kernel and loading it in a new Python process that imports torch, once in every process
# that compiles (every rank, every engine core): about 20 s of a 2-core machine per process, for nothing
# the flags do not already say. Inherited by the ranks and torchrun jobs the tests start.
os.environ.setdefault("TORCHINDUCTOR_VEC_ISA_OK", "1")
