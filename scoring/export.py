"""``python -m scoring.export RUN_DIR --out BUNDLE``: the exporter's command line (:mod:`scoring.entry.export`)."""
import sys

if __name__ == "__main__":
    from scoring.entry.export import main

    sys.exit(main())
