"""kto-jax: human-aware alignment losses (KTO, DPO and the HALO family) in JAX."""

import glob
import importlib.util
import os

__version__ = "0.1.0"


def _leave_out_absent_tpu() -> None:
    """With libtpu installed (the ``[tpu]`` extra, for AOT fit checks) on a host without TPU chips,
    JAX's TPU plugin prints a ``TPU_WORKER_HOSTNAMES`` error at start-up while looking for chips
    that are not there. Leave TPUs out of backend discovery then (GPUs and the CPU stay in);
    compiling for a TPU topology (``kto_jax.train.aot``) does not need the TPU backend. An explicit
    ``JAX_PLATFORMS`` is left as it is."""
    if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
        return
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):  # TPU VM chips
        return
    gpu = [
        p
        for p, m in (("cuda", "jax_cuda12_plugin"), ("cuda", "jax_cuda13_plugin"), ("rocm", "jax_rocm60_plugin"))
        if importlib.util.find_spec(m)
    ]
    os.environ["JAX_PLATFORMS"] = ",".join(dict.fromkeys(gpu + ["cpu"]))
    import sys

    if "jax" in sys.modules:  # already imported: its config read the environment before us
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


_leave_out_absent_tpu()
