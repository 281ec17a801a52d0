"""``tvm-cim``: compile ONNX models for CIM crossbars, inspect them and run the result.

Subcommands::

    tvm-cim compile MODEL.onnx -o OUT.so [--arch PRESET|FILE] [--precision CFG]
                [--input-shape NAME:D0,D1,... ...] [--calibration FILE.npz|FILE.npy|DIR]
                [--report FILE.json] [--dump-programs DIR]
    tvm-cim inspect MODEL.onnx [--input-shape NAME:D0,D1,... ...] [--arch PRESET|FILE]
                [--precision CFG]
    tvm-cim run OUT.so --input NAME=FILE.npy ... [--output-dir DIR] [--stats FILE.json]
                [--no-digest]

``compile`` partitions the model, lowers its dense and convolution operators to crossbar
programs, prints the per-operator report and exports the executable as a shared library
(``export_library``); ``run`` loads such a library in the Relax VM, which calls the
simulator for each crossbar region. Operator names are the ONNX node names. ``train``,
``report`` and ``search`` train a zoo model, study its latency and search its bit widths.

Exit status: 0 on success, 2 for a usage error or bad input (a missing or malformed file,
a model or configuration the compiler refuses: any ``CimError``), 3 for an unexpected
error (with a hint to report it). Errors are reported as one line of at most 200
characters, ``tvm-cim: error: <message>``, on stderr; the warnings of TVM, PyTorch and NumPy
are silenced, and ``--verbose`` shows them, the full message and an unexpected error's
traceback. A command that fails removes the files it created. TVM is imported only by the
subcommands that need it.
"""

from __future__ import annotations

import sys

from tvm_cim import __version__
from tvm_cim.cli import compile as cli_compile
from tvm_cim.cli import report as cli_report
from tvm_cim.cli import run as cli_run
from tvm_cim.cli import search as cli_search
from tvm_cim.cli import train as cli_train
from tvm_cim.cli.common import Cli, Command

PROG = "tvm-cim"

TVM_CIM = Cli(
    prog=PROG,
    description="Compile ONNX models for RRAM computing-in-memory crossbars with TVM.",
    commands=(
        Command(
            "compile",
            "compile an ONNX model for CIM crossbars and export it as a library",
            cli_compile.compile_arguments,
            cli_compile.compile_model,
        ),
        Command(
            "inspect",
            "list the operators the crossbars run and those left on the CPU",
            cli_compile.inspect_arguments,
            cli_compile.inspect_model,
        ),
        Command(
            "run",
            "run a compiled library on .npy inputs with the simulator",
            cli_run.run_arguments,
            cli_run.run_library,
        ),
        Command(
            "train",
            "train a zoo model: FP32, W8A8 QAT or mixed-precision finetuning",
            cli_train.train_arguments,
            cli_train.train,
        ),
        Command(
            "report",
            "latency study of a zoo model: per layer, total and speedup over W8A8",
            cli_report.report_arguments,
            cli_report.report,
        ),
        Command(
            "search",
            "search per-operator bit widths: DQN, DDPG, TPE or random search",
            cli_search.search_arguments,
            cli_search.search,
        ),
    ),
    version=f"{PROG} {__version__}",
)


#: Entry point of ``tvm-cim``: ``main(argv=None)`` runs ``argv`` (``sys.argv[1:]`` when
#: None) and returns the exit status.
main = TVM_CIM.main


if __name__ == "__main__":
    sys.exit(main())
