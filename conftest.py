"""Hypothesis profiles for the whole repository.

`ci` (what `nox -s tests` sets): derandomized, so a fresh clone runs the same examples every time and
a red CI run is reproducible; no example database. `fuzz` (what `nox -s fuzz` sets): random seeds and
more examples, to find new failures (a test's own ``max_examples`` still caps it). `dev`: the default.
"""

import os

import torch

# Triton's interpreter is chosen when triton is first imported (its language's own functions are built then):
# set before any test imports it, so tests can run grafting's Triton kernels on CPU tensors (grafting_lora.dora_kernels);
# on a CUDA machine the kernels are compiled and run on the GPU
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "fuzz",
    max_examples=200,
    deadline=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile("dev", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_report_header() -> list[str]:
    """Which CPU ran the suite: float results may differ in the last bits from one CPU to another."""
    import platform

    import torch

    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), model)
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return [f"cpu: {model}, torch {torch.__version__} capability {capability}, {torch.get_num_threads()} threads"]
