"""The seed's entry point, kept: `python run_pipeline.py --config C` is `reelflow run --config C`."""

import sys

from daemon.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
