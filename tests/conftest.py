"""Suite-wide: the header names the CPU code paths this host runs, so two hosts' results can be
compared knowing what each one exercised (README, "Tests": which CPU paths the suite covers)."""

from __future__ import annotations

import platform


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pytest_report_header(config):  # noqa: ARG001
    import torch

    from tulu.inference.cpu_shm import vllm_cpu_kernels

    lines = [f"cpu: {_cpu_model()}; torch kernels: {torch.backends.cpu.get_cpu_capability()}"]
    if platform.machine() in ("x86_64", "AMD64"):
        kernels = vllm_cpu_kernels()
        tp_path = ("torch.distributed (no SHM communicator)" if kernels == "_C_AVX2"
                   else "shared-memory communicator")
        lines.append(f"vLLM-CPU kernels: vllm.{kernels}; vLLM TP/PP groups use the {tp_path}")
    return lines
