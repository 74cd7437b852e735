import sys
from pathlib import Path

# benchmarks share the tests' reference loops (tests/support.py)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
