"""Build script for tvm-cim.

The four component folders are installed as subpackages of ``tvm_cim`` so that
nothing called ``sim`` or ``agent`` lands in site-packages.
"""

import subprocess
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

HERE = Path(__file__).resolve().parent

# Installed package name -> source folder.
COMPONENTS = {
    "tvm_cim.sim": "sim",
    "tvm_cim.codegen": "codegen",
    "tvm_cim.relay_passes": "relay_passes",
    "tvm_cim.agent": "agent",
}


def _packages():
    """List ``tvm_cim``, its subpackages and the component folders' subpackages."""
    packages = ["tvm_cim"] + [f"tvm_cim.{p}" for p in find_packages("tvm_cim")]
    package_dir = {"tvm_cim": "tvm_cim"}
    for name, folder in COMPONENTS.items():
        packages.append(name)
        package_dir[name] = folder
        for sub in find_packages(folder):
            packages.append(f"{name}.{sub}")
            package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
    return packages, package_dir


PACKAGES, PACKAGE_DIR = _packages()

# The compiled core includes its opcodes, operand layout and dispatch from sim/_isa.pxi,
# generated from the ISA table (sim/isa.py) before Cython compiles it.
subprocess.run(
    [sys.executable, str(HERE / "sim" / "isa_pxi.py"), str(HERE / "sim" / "_isa.pxi")], check=True
)

EXTENSIONS = cythonize(
    [
        Extension(
            "tvm_cim.sim._core",
            ["sim/_core.pyx"],
            include_dirs=[numpy.get_include()],
            extra_compile_args=["-O3"],
        )
    ],
    compiler_directives={
        "language_level": 3,
        "boundscheck": False,
        "wraparound": False,
        "cdivision": True,
    },
)

# pyelftools reads a compiled library's ELF headers before ``tvm-cim run`` loads it.
TVM_REQUIRES = ["apache-tvm==0.27.0.post1", "onnx>=1.16", "tqdm>=4.60", "pyelftools>=0.31"]
TRAIN_REQUIRES = ["scikit-learn>=1.3", "mnist1d>=0.0.2"]
SEARCH_REQUIRES = [
    "gymnasium>=1.0,<2",
    "stable-baselines3>=2.9,<3",
    "optuna>=4,<5",
    "matplotlib>=3.7",
    # SQLAlchemy 2.1 reads a plain postgresql:// URL with psycopg 3 (shared TPE studies)
    "psycopg[binary]>=3.2,<4",
    # policy evaluations as tasks: a local cluster, or a running one (see README)
    "distributed>=2025.1",
]
# Reading QONNX files (Quant nodes with a bit-width input, as FINN and Brevitas write them).
QONNX_REQUIRES = ["qonnx==1.0.0"]
DEV_REQUIRES = [
    "pytest>=8",
    "pytest-xdist>=3.5",  # `make test` spreads the suite over the machine's cores
    "hypothesis>=6",
    "ruff>=0.6",
    "import-linter>=2.1",
    "networkx>=3",
    "onnxruntime>=1.17",  # the reference producer and runtime for models from other tools
    # Producers whose files the conformance tests compile. Brevitas pins setuptools<81 and,
    # in its export extra, an old onnx: it is installed without that extra, and its QCDQ
    # export's own needs (onnxoptimizer, onnxscript) are listed here instead.
    "brevitas==0.13.4",
    "onnxoptimizer>=0.3",
    "onnxscript>=0.1",
] + QONNX_REQUIRES

setup(
    name="tvm-cim",
    version="0.1.0",
    description="Compiler and simulator for RRAM Computing-in-Memory crossbar accelerators",
    python_requires=">=3.10",
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    ext_modules=EXTENSIONS,
    install_requires=["array-api-compat>=1.9", "numpy>=1.26", "pyyaml>=6", "scipy>=1.11"],
    extras_require={
        "tvm": TVM_REQUIRES,
        "train": TRAIN_REQUIRES,
        "search": SEARCH_REQUIRES,
        "qonnx": QONNX_REQUIRES,
        "dev": DEV_REQUIRES,
        "all": TVM_REQUIRES + TRAIN_REQUIRES + SEARCH_REQUIRES + DEV_REQUIRES,
    },
    entry_points={
        "console_scripts": [
            "cim-sim = tvm_cim.cli.sim:main",
            "tvm-cim = tvm_cim.cli.main:main",
        ]
    },
    zip_safe=False,
)
