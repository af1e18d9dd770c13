import sys

from pipeline.cli import main

if __name__ == "__main__":  # vLLM spawns workers that re-import the main module
    sys.exit(main())
