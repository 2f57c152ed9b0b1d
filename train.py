"""The command line: `python train.py fit --config configs/quickstart.yaml [--model ...] [--data ...]`.

The CLI itself is `lab/cli.py` (`BeyondNTPCLI`); `train.main(args)` runs it in-process and returns it."""
from lab.cli import BeyondNTPCLI, main, run_from_the_shell  # noqa: F401 (train.main and the CLI class are public)

if __name__ == "__main__":
    run_from_the_shell()
