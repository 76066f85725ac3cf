"""Every test process and the processes it starts compute in fp32 on any CPU: `auto` would pick
bf16 on CPUs with native bf16 (runtime.cpu_has_bf16), and the tests' tolerances are fp32's.
Tests of the bf16 paths ask for bf16 by name."""
import os

os.environ["COMPETITION_CPU_BF16"] = "0"

# The cores' share, decided once for the session (competition/__init__.py): beside another job the
# tests and every process they start compute on the free cores only, and say so once, here.
import competition  # noqa: E402,F401
